"""The store's commands of `fot-memory`: read, ask, docs, forget, reindex, info, verify, repair.

Each checks what it can before the model loads (files, names, the question, the store); only
`read` ever makes a store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.config import ANSWER_MODES, DEFAULT_ANSWER_MODE, DEFAULT_INDEX, DEFAULT_RANKING, INDEX_KINDS, RANKINGS
from ..distributed.commands import add_ray_option, add_shard_command, open_on_ray, read_on_ray  # no Ray import
from .cli import _device_option, parse_layers

__all__ = ["add_store_commands"]


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="store directory (default: $FOT_MEMORY_STORE or the user data directory)")


def add_store_commands(commands: argparse._SubParsersAction) -> None:
    read = commands.add_parser("read", help="read documents into the store (once; the store keeps them)")
    read.add_argument("paths", nargs="+", metavar="PATH", help="plain-text or markdown files")
    _store_option(read)
    read.add_argument("--name", help="document name (one PATH only; default: the file name)")
    read.add_argument("--force", action="store_true", help="read again even if already stored; replace same name")
    read.add_argument("--json", action="store_true", help="print the stored documents as JSON")
    read.add_argument("--model", help="model for a NEW store: 'smollm2-fot' (default: the FoT-tuned delta), 'smollm2' "
                                      "(zero-shot, every layer a memory layer) or a local model path (an existing "
                                      "store keeps its own)")
    read.add_argument("--mem-layers", help="memory layers for a new store: all | 0,5,10 | 0-14 (default: a FoT-tuned "
                                           "model's trained layers, else all)")
    read.add_argument("--local-window", type=int, help="reading window for a new store (default 512)")
    read.add_argument("--mem-dtype", choices=("float16", "int8", "bfloat16", "float32"), default=None,
                      help="how a new store keeps keys and values: float16 (default, 3.9 KB per token with 5 "
                           "memory layers), int8 (a scale per vector: 2.1 KB per token), ...")
    read.add_argument("--retrieval", action=argparse.BooleanOptionalAction, default=None,
                      help="retrieve from earlier windows while reading (default: not for a FoT-tuned model, whose "
                           "training computes memory keys without it and which finds evidence better so; yes for a "
                           "zero-shot one, which loses the passkey without it)")
    read.add_argument("--index", choices=INDEX_KINDS, default=None,
                      help="how the keys are indexed: clusters (k-means inverted file, ~13 B per token per layer, "
                           "built at commit) or hnsw (hnswlib graphs, ~1.1 KB per token per layer, built while "
                           f"reading); default {DEFAULT_INDEX}. `fot-memory reindex --index` changes it later")
    read.add_argument("--shared", action="store_true",
                      help="a NEW store's files get your umask's permissions instead of owner-only (0600/0700)")
    _device_option(read)
    add_ray_option(read, "one task per document, imported into the store as each finishes")
    read.set_defaults(handler=_read)

    ask = commands.add_parser("ask", help="answer a question from stored documents, with sources")
    ask.add_argument("question", help="the question, or (with --no-chat) the text the answer completes")
    _store_option(ask)
    ask.add_argument("--doc", action="append", metavar="ID_OR_NAME", help="attend to this document (repeatable)")
    ask.add_argument("--max-new-tokens", type=int, default=64, help="the most tokens in the answer")
    ask.add_argument("--no-chat", action="store_true", help="complete the text as given, without the chat template")
    ask.add_argument("--instruction", default=None, metavar="TEXT",
                     help="appended to the question in the chat template (default: the answer mode's own, "
                          "' Answer in a few words.' for passages; '' for none)")
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--sources", type=int, default=3, help="passages to cite")
    ask.add_argument("--json", action="store_true", help='print {"answer": ..., "sources": [...]}')
    ask.add_argument("--exact", action="store_true",
                     help="scan every stored key instead of the hnswlib indexes (the reference; slower)")
    ask.add_argument("--answer-mode", choices=ANSWER_MODES, default=DEFAULT_ANSWER_MODE,
                     help="memory: the memory layers attend while answering; passages: the passages the question "
                          "draws memory attention to are put, as text, before it and answered from with memory "
                          "detached; reread: the same with memory attached (default: %(default)s)")
    ask.add_argument("--ranking", choices=RANKINGS, default=DEFAULT_RANKING,
                     help="source ranking: lift (attention beyond a question-independent probe) or attention "
                          "(default: %(default)s)")
    _device_option(ask)
    add_ray_option(ask, "serve the store, or the shards of a catalog (--store OUT of `fot-memory shard`), from Ray actors")
    ask.set_defaults(handler=_ask)

    docs = commands.add_parser("docs", help="list stored documents")
    _store_option(docs)
    docs.add_argument("--json", action="store_true", help="print the documents as JSON")
    docs.set_defaults(handler=_docs)

    forget = commands.add_parser("forget", help="delete a document from the store")
    forget.add_argument("document", metavar="ID_OR_NAME", help="the document's id or name (see `fot-memory docs`)")
    _store_option(forget)
    forget.set_defaults(handler=_forget)

    reindex = commands.add_parser(
        "reindex", help="rebuild documents' indexes from their stored keys (no model; after an upgrade, or to "
                        "change the index kind)")
    reindex.add_argument("documents", nargs="*", metavar="ID_OR_NAME", help="documents to re-index (default: all)")
    _store_option(reindex)
    reindex.add_argument("--json", action="store_true", help="print the re-indexed documents as JSON")
    reindex.add_argument("--index", choices=INDEX_KINDS, default=None,
                         help="index kind to build (default: each document's own; see `read --index`)")
    reindex.set_defaults(handler=_reindex)

    info = commands.add_parser("info", help="the store's model, memory config and size")
    _store_option(info)
    info.add_argument("--json", action="store_true", help="print the information as JSON")
    info.set_defaults(handler=_info)

    verify = commands.add_parser("verify", help="check every stored file against its checksum (exit 1 if damaged)")
    verify.add_argument("--doc", action="append", metavar="ID_OR_NAME", help="check only this document (repeatable)")
    _store_option(verify)
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(handler=_verify)

    repair = commands.add_parser(
        "repair", help="rebuild a lost or damaged database from the documents' manifests (deletes nothing)")
    _store_option(repair)
    repair.add_argument("--json", action="store_true", help="print the report as JSON")
    repair.set_defaults(handler=_repair)
    add_shard_command(commands)


def _open_documents(args: argparse.Namespace, readonly: bool = False, with_model: bool = True):
    from ..documents.document_memory import DocumentMemory

    config = None
    if getattr(args, "mem_layers", None) or getattr(args, "local_window", None):
        from ..documents.document_memory import STORE_DEFAULTS

        layers = None if args.mem_layers in (None, "all") else parse_layers(args.mem_layers, num_layers=0)
        config = STORE_DEFAULTS.replace(
            mem_layers=layers, local_window=args.local_window or STORE_DEFAULTS.local_window
        )
    return DocumentMemory.open(
        args.store, model=getattr(args, "model", None), config=config, device=args.device, readonly=readonly,
        hold_lock=not readonly, shared=getattr(args, "shared", False), mem_dtype=getattr(args, "mem_dtype", None),
    )


def _record_dict(record) -> dict:
    return {
        "id": record.id, "name": record.name, "source_path": record.source_path, "tokens": record.num_tokens,
        "characters": record.text_length, "created": record.created, "sha256": record.sha256,
    }


def _read(args: argparse.Namespace) -> int:
    if getattr(args, "ray", None) is not None:
        return read_on_ray(args)
    from ..documents.document_memory import load_text
    from ..persistence.files import validate_name

    if args.name is not None and len(args.paths) > 1:
        raise ValueError("--name names one document: give one PATH with it, or leave --name out.")
    for path in args.paths:  # cheap checks first: the model takes seconds to load
        validate_name(args.name if args.name is not None else Path(path).name)
        load_text(path)
    stored = []
    with _open_documents(args) as memory:  # the store (and its writer lock) before the model
        for number, path in enumerate(args.paths, 1):
            record, fresh = memory.read_file(path, name=args.name, force=args.force, progress=not args.json,
                                             retrieve=args.retrieval, index=args.index,
                                             prepare=number == len(args.paths))  # once, after the last
            stored.append(_record_dict(record) | {"read_now": fresh})
            if not args.json:
                verb = "read" if fresh else "already stored (use --force to read again)"
                print(f"{path}: {verb} as {record.name!r} [{record.id}], {record.num_tokens} tokens")
    if args.json:
        print(json.dumps({"documents": stored}))
    return 0


def _ask(args: argparse.Namespace) -> int:
    if not args.question.strip():
        raise ValueError("The question is empty: give the question (or, with --no-chat, the text to complete).")
    from ..documents.long_prompts import ask_any_length

    on_ray = getattr(args, "ray", None) is not None
    with open_on_ray(args) if on_ray else _open_documents(args, readonly=True) as memory:
        on_text = (lambda piece: print(piece, end="", flush=True)) if args.stream and not args.json else None
        answer = ask_any_length(  # a question longer than the local window: its head is read into memory
            memory, args.question, docs=args.doc, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
            on_text=on_text, num_sources=args.sources, exact=args.exact, answer_mode=args.answer_mode,
            ranking=args.ranking, instruction=args.instruction,
        )
    for item in answer.left_out:
        print(f"fot-memory: note: left out the damaged document {item.doc!r} [{item.doc_id}]: {item.problem} "
              f"(forget it and read it again)", file=sys.stderr)
    if args.json:
        print(json.dumps(answer.to_dict()))
        return 0
    print(answer.text if on_text is None else "")
    for number, source in enumerate(answer.sources, 1):
        passage = " ".join(source.text.split())
        print(f"[{number}] {source.doc} chars {source.start_char}-{source.end_char} "
              f"(weight {source.weight:.3f}): {passage}")
    return 0


def _plain_store(args: argparse.Namespace, readonly: bool = True):
    """The store without a model; never created here (only `read` makes a store)."""
    from ..documents.document_memory import default_store_dir
    from ..persistence import MemoryStore

    return MemoryStore.open(args.store or default_store_dir(), create=False, readonly=readonly)


def _docs(args: argparse.Namespace) -> int:
    with _plain_store(args) as store:
        damaged = store.verify(checksum=False)  # sizes only: `verify` reads every byte
        records = [_record_dict(record) | {"damaged": damaged.get(record.id)} for record in store.documents()]
    if args.json:
        print(json.dumps({"documents": records}))
    for record in [] if args.json else records:
        status = f"  DAMAGED: {record['damaged']}" if record["damaged"] else ""
        print(f"{record['id']}  {record['name']}  {record['tokens']} tokens  {record['created']}{status}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _plain_store(args) as store:
        records = [store.document(name) for name in args.doc] if args.doc else store.documents()
        problems = {}
        for record in records:
            problems.update(store.verify(record.id, progress=not args.json))
        report = [{"id": r.id, "name": r.name, "problem": problems.get(r.id)} for r in records]
    if args.json:
        print(json.dumps({"documents": report, "damaged": len(problems)}))
    else:
        for item in report:
            print(f"{item['id']}  {item['name']}  {'DAMAGED: ' + item['problem'] if item['problem'] else 'ok'}")
        print(f"{len(report) - len(problems)} of {len(report)} documents ok" +
              (": forget the damaged ones and read them again" if problems else ""))
    return 1 if problems else 0


def _repair(args: argparse.Namespace) -> int:
    from ..documents.document_memory import default_store_dir
    from ..persistence import StoreNotFoundError, repair_store

    path = Path(args.store or default_store_dir())
    if not ((path / "memory.sqlite").exists() or (path / "docs").is_dir()):
        raise StoreNotFoundError(str(path))  # nothing to repair: not a damaged store, no store at all
    report = repair_store(path)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    print(f"database: {report.database}")
    for name in report.restored:
        print(f"restored {name!r}")
    for directory, reason in report.moved_to_lost_found.items():
        print(f"moved {directory}: {reason}")
    for name in report.missing_files:
        print(f"{name!r} has a row but no files: forget it and read it again")
    if not (report.restored or report.moved_to_lost_found or report.missing_files):
        print("nothing to repair")
    return 0


def _forget(args: argparse.Namespace) -> int:
    with _plain_store(args, readonly=False) as store:
        record = store.forget(args.document)
    print(f"forgot {record.name!r} [{record.id}]")
    return 0


def _reindex(args: argparse.Namespace) -> int:
    from ..documents.document_memory import default_store_dir
    from ..persistence import IndexParams, MemoryStore
    from ..persistence.store import index_kind

    path = args.store or default_store_dir()
    with MemoryStore.open(path, create=False, readonly=True) as store:
        fingerprint = store.fingerprint
    if fingerprint is None:
        print(f"{path}: no documents to re-index")
        return 0
    window = (fingerprint.get("memory_config") or {}).get("local_window")
    if not isinstance(window, int):
        raise ValueError(f"{path} records no reading window (memory_config.local_window): it was not written by "
                         "`fot-memory read`; re-index it with MemoryStore.reindex(..., window=...).")
    # The store's own fingerprint: the keys are re-fed as they were read, by the same model.
    with MemoryStore.open(path, fingerprint=fingerprint, create=False) as store:
        names = args.documents or [record.id for record in store.documents()]
        done = []
        for name in names:
            old = store.document(name)
            params = IndexParams(kind=args.index or index_kind(old))
            record = store.reindex(old.id, window=window, index_params=params, progress=not args.json)
            done.append(_record_dict(record) | {"replaced_id": old.id})
            if not args.json:
                print(f"re-indexed {record.name!r}: [{old.id}] -> [{record.id}], {record.num_tokens} tokens")
    if args.json:
        print(json.dumps({"documents": done}))
    return 0


def _info(args: argparse.Namespace) -> int:
    with _plain_store(args) as store:
        info = store.info()
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return 0
