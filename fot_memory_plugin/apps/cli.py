"""The `fot-memory` command line.

Only argparse and the configuration modules are imported until a command runs, so `--help`
and `--version` answer at once; every command checks its inputs (files, names, the store)
before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..core.config import ANSWER_MODES, DEFAULT_ANSWER_MODE, DEFAULT_RANKING, RANKINGS, MemoryConfig
from ..distributed.commands import add_ray_option, add_shard_command, open_on_ray, read_on_ray  # no Ray import

__all__ = ["main", "build_parser", "parse_layers"]


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...] | None:
    """Layer spec -> indices: "all", "0,5,10", "0-14", "every3" (0, 3, 6, ...), "last15"."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    if spec.startswith("every"):
        return tuple(range(0, num_layers, int(spec[5:])))
    if spec.startswith("last"):
        return tuple(range(num_layers - int(spec[4:]), num_layers))
    if spec.startswith("first"):
        return tuple(range(int(spec[5:])))
    layers: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            low, high = part.split("-")
            layers.extend(range(int(low), int(high) + 1))
        elif part:
            layers.append(int(part))
    return tuple(layers)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none to show or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every parser and sub-parser of the command shows defaults (sub-parsers take the parser's class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _device_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", help="where the model runs: cpu, cuda, cuda:1, mps, ... (default: cpu)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2",
                       help="'smollm2' (bundled), 'smollm2-fot' (FoT-tuned delta) or a local model path")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the model's weights and compute (float32 is fastest on a CPU)")
    _device_option(group)


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    defaults = MemoryConfig()
    group = parser.add_argument_group("memory")
    group.add_argument("--local-window", type=int, default=defaults.local_window, help="tokens per window")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="memory keys retrieved per query")
    group.add_argument("--mode", choices=["zero", "fixed"], default=defaults.positional_mode, help="positional mode")
    group.add_argument(
        "--mem-layers", help="memory layers: all | 0,5,10 | 0-14 | every3 | first15 | last15 "
        "(default: a FoT-tuned model's own layers, else all)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fot-memory", description="FoT long-context memory for language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate memory on a benchmark task")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    passkey = tasks.add_parser("passkey", help="passkey retrieval: memory vs the model truncated to its window")
    passkey.add_argument("--lengths", type=int, nargs="+", default=[4000, 16000], help="prompt lengths in tokens")
    passkey.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths in [0, 1]")
    passkey.add_argument("--trials", type=int, default=3, help="trials per length and depth")
    passkey.add_argument("--seed", type=int, default=0, help="seed of the passkeys and filler")
    passkey.add_argument("--no-baseline", action="store_true", help="skip the truncated-model baseline")
    passkey.add_argument(
        "--read-without-retrieval", action="store_true", help="read the prompt into memory without retrieval"
    )
    passkey.add_argument("--json", action="store_true", help="print one JSON object with every result")
    passkey.add_argument("--plot", metavar="FILE.png", help="write a depth x length accuracy heatmap")
    _add_model_options(passkey)
    _add_memory_options(passkey)
    passkey.set_defaults(handler=_eval_passkey)
    perplexity = tasks.add_parser("perplexity", help="a text's last tokens' perplexity vs tokens in memory")
    perplexity.add_argument("text", metavar="PATH", help="a long plain-text file (hold it out of training)")
    perplexity.add_argument("--memory-sizes", type=int, nargs="+", default=[0, 2048, 8192, 32768],
                            help="tokens read into memory before the scored ones")
    perplexity.add_argument("--scored", type=int, default=2048, help="tokens scored at the end of the text")
    perplexity.add_argument("--read-without-retrieval", action="store_true",
                            help="compute the keys entering memory without retrieval (predictions still retrieve)")
    perplexity.add_argument("--json", action="store_true", help="print one JSON object with every result")
    _add_model_options(perplexity)
    _add_memory_options(perplexity)
    perplexity.set_defaults(handler=_eval_perplexity)
    _add_store_commands(commands)
    _add_train_command(commands)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    from ..training.config import DEFAULT_MEM_LAYERS, TrainConfig

    defaults = TrainConfig()
    train = commands.add_parser("train", help="FoT cross-batch training; writes a delta for load_model(..., delta=)")
    train.add_argument("data", nargs="*", metavar="PATH", help="text files or directories of them (one file = one document)")
    train.add_argument("--corpus-tokens", metavar="FILE.npz", help="a tokenized corpus from an earlier run, instead of PATHs")
    train.add_argument("--out", required=True, help="run directory: checkpoint, log, delta/ (an existing one resumes)")
    train.add_argument("--hold-out", nargs="*", default=[], metavar="NAME", help="files (name or stem) kept out of training")
    train.add_argument("--model", default="smollm2", help="'smollm2' (default) or a local model path")
    _device_option(train)
    train.add_argument("--mem-layers", default=",".join(map(str, DEFAULT_MEM_LAYERS)), help="memory layers, e.g. 5,9,13")
    train.add_argument("--window", type=int, default=defaults.window, help="tokens per window (the local window)")
    train.add_argument("--batch-docs", type=int, default=defaults.batch_docs, help="documents per step (2 windows each)")
    train.add_argument("--group-schedule", default="2@0,4@0.25,8@0.5",
                       help="d (documents per memory) by fraction of training: d@fraction,...")
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    train.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps")
    train.add_argument("--trainable", choices=["memory-attention", "all"], default=defaults.trainable,
                       help="memory-attention: only the memory layers' q/k/v/o (a small delta); all: every weight")
    train.add_argument("--copy-probability", type=float, default=defaults.copy_probability,
                       help="share of documents whose current window gets a passage of the previous one pasted in")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    train.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default=defaults.precision,
                       help="auto: bfloat16 autocast on a GPU, float32 on a CPU")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of sampling and initialisation")
    train.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps; 0 never")
    train.add_argument("--time-limit", type=float, help="seconds; stop early with a checkpoint (resume later)")
    train.add_argument("--tokens-cache", help="directory for the tokenized corpus (default: --out)")
    train.add_argument("--compare-plain", type=int, default=0, metavar="STEPS",
                       help="first time this many steps of cross-batch vs plain fine-tuning")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from ..training.run import run_training
    from ..training.config import TrainConfig

    if not args.data and not args.corpus_tokens:
        raise ValueError("Give training text (PATH ...) or --corpus-tokens FILE.npz.")
    for path in [*args.data, *([args.corpus_tokens] if args.corpus_tokens else [])]:  # before the model loads
        if not Path(path).exists():
            raise ValueError(f"{path} does not exist: give text files, directories of them, or a --corpus-tokens file.")
    schedule = tuple((float(fraction), int(group)) for group, fraction in
                     (item.split("@") for item in args.group_schedule.split(",")))
    layers = parse_layers(args.mem_layers, 10**6)
    if layers is None or args.mem_layers.startswith(("every", "last")):
        raise ValueError("fot-memory train needs explicit --mem-layers (e.g. 5,9,13 or 0-29 for all 30 layers).")
    config = TrainConfig(
        mem_layers=layers, window=args.window, batch_docs=args.batch_docs,
        group_schedule=schedule, steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        trainable=args.trainable, gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
        seed=args.seed, checkpoint_every=args.checkpoint_every, copy_probability=args.copy_probability,
    )
    summary = run_training(
        args.data, args.out, config, model=args.model, hold_out=args.hold_out, device=args.device,
        tokens_cache=args.tokens_cache, corpus_tokens=args.corpus_tokens, time_limit=args.time_limit,
        compare_plain_steps=args.compare_plain,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", help="store directory (default: $FOT_MEMORY_STORE or the user data directory)")


def _add_store_commands(commands: argparse._SubParsersAction) -> None:
    read = commands.add_parser("read", help="read documents into the store (once; the store keeps them)")
    read.add_argument("paths", nargs="+", metavar="PATH", help="plain-text or markdown files")
    _store_option(read)
    read.add_argument("--name", help="document name (one PATH only; default: the file name)")
    read.add_argument("--force", action="store_true", help="read again even if already stored; replace same name")
    read.add_argument("--json", action="store_true", help="print the stored documents as JSON")
    read.add_argument("--model", help="model for a NEW store: 'smollm2' (default), 'smollm2-fot' or a local model path "
                                      "(an existing store keeps its own)")
    read.add_argument("--mem-layers", help="memory layers for a new store: all (default) | 0,5,10 | 0-14")
    read.add_argument("--local-window", type=int, help="reading window for a new store (default 512)")
    read.add_argument("--no-retrieval", action="store_true",
                      help="read each window without retrieval: the plain model's speed; fine for a FoT-tuned "
                           "model (its training computes memory keys so), not for a zero-shot one")
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
    ask.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    ask.add_argument("--sources", type=int, default=3, help="passages to cite")
    ask.add_argument("--json", action="store_true", help='print {"answer": ..., "sources": [...]}')
    ask.add_argument("--exact", action="store_true",
                     help="scan every stored key instead of the hnswlib indexes (the reference; slower)")
    ask.add_argument("--answer-mode", choices=ANSWER_MODES, default=DEFAULT_ANSWER_MODE,
                     help="memory: the memory layers attend while answering; reread: the passages the question "
                          "draws attention to are put, as text, before it (default: %(default)s)")
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
        "reindex", help="rebuild documents' hnswlib indexes from their stored keys (no model; after an upgrade)")
    reindex.add_argument("documents", nargs="*", metavar="ID_OR_NAME", help="documents to re-index (default: all)")
    _store_option(reindex)
    reindex.add_argument("--json", action="store_true", help="print the re-indexed documents as JSON")
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
        hold_lock=not readonly, shared=getattr(args, "shared", False),
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
        for path in args.paths:
            record, fresh = memory.read_file(path, name=args.name, force=args.force, progress=not args.json,
                                             retrieve=not args.no_retrieval)
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
            ranking=args.ranking,
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
            problems.update(store.verify(record.id))
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
    from ..persistence import MemoryStore

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
            record = store.reindex(old.id, window=window)
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


def _engine(args: argparse.Namespace):
    from ..core.engine import MemoryEngine
    from ..models.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.mem_layers is None:
        layers = loaded.memory_config.mem_layers if loaded.memory_config is not None else None
    else:
        layers = parse_layers(args.mem_layers, loaded.model.config.num_hidden_layers)
    config = MemoryConfig(
        mem_layers=layers, local_window=args.local_window, top_k=args.top_k, positional_mode=args.mode
    )
    return MemoryEngine(loaded.model, loaded.tokenizer, config)


def _eval_passkey(args: argparse.Namespace) -> int:
    from .passkey import accuracy_table, plot_heatmap, run_passkey

    engine = _engine(args)
    results = []
    runs = run_passkey(
        engine, args.lengths, args.depths, args.trials, seed=args.seed, baseline=not args.no_baseline,
        read_retrieval=not args.read_without_retrieval,
    )
    for result in runs:
        results.append(result)
        if not args.json:
            kind = "memory   " if result.memory else "truncated"
            mark = "ok  " if result.correct else "miss"
            print(f"{kind} {result.length:>7} tok  depth {result.depth:.2f}  {mark} {result.answer.strip()[:30]!r}")
    if args.plot:
        plot_heatmap(results, args.plot, title=f"passkey, window {args.local_window}, mode {args.mode}")
    if args.json:
        print(json.dumps({"results": [result.to_dict() for result in results]}))
    else:
        for (memory, length, depth), (correct, total) in sorted(accuracy_table(results).items()):
            print(f"{'memory' if memory else 'truncated':9} ~{length:>6} tok depth {depth:.2f}: {correct}/{total}")
    return 0


def _eval_perplexity(args: argparse.Namespace) -> int:
    from ..documents.document_memory import load_text
    from .perplexity import memory_perplexity

    text = load_text(args.text)  # before the model loads: a wrong path fails at once
    engine = _engine(args)
    ids = engine.encode(text)
    results = [memory_perplexity(engine, ids, 0, args.scored, truncated=True)]
    results += [memory_perplexity(engine, ids, size, args.scored, read_retrieval=not args.read_without_retrieval)
                for size in args.memory_sizes]
    if args.json:
        print(json.dumps({"results": [result.to_dict() for result in results]}))
        return 0
    for result in results:
        kind = "truncated" if result.truncated else f"{result.memory_tokens:>7} in memory"
        print(f"{kind:>17}: perplexity {result.perplexity:8.2f} over {result.scored_tokens} predictions")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..core.errors import FoTMemoryError, StoreError, StoreNotFoundError

    try:
        return args.handler(args)
    except StoreNotFoundError as error:
        print(f"fot-memory: error: No memory store at {error.path} (nothing was created there): `fot-memory read "
              f"FILE --store {error.path}` makes one; check the path, --store and $FOT_MEMORY_STORE.", file=sys.stderr)
        return 2
    except (FoTMemoryError, StoreError, ValueError) as error:
        # Our errors carry a sentence that says what to do; a traceback would only hide it.
        print(f"fot-memory: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file of the user's own (not the store's, which raises StoreError)
        print(f"fot-memory: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fot-memory: interrupted; nothing half-written is visible in the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
