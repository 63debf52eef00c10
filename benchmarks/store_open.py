"""Open + first answer of 100k- and 1M-token stores in a fresh process, per index kind, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_open.py SOURCE_STORE
    # = --sizes 100000 1000000 --kinds clusters hnsw --noise 0.1 --question "The village of Longbourn was only one mile from"

SOURCE_STORE holds one real document read by `fot-memory read` (for example the whole of Pride
and Prejudice read by smollm2-fot: 167,891 tokens, 5 memory layers). A store of SIZE tokens is
made from it through the writer, as a read would make it: the real document (cut to SIZE if
longer), then copies of its keys and values with gaussian noise of `noise` x each layer's
per-dimension standard deviation, as further documents, up to SIZE tokens (chunks copied, so
sources are real passages), and what `fot-memory read` keeps for answers after a read
(`DocumentMemory.prepare_answers`: the baseline probe's chunk shares). Then, in a fresh process
each (warm page cache, imports not counted): open the store read-only and the model
(`DocumentMemory.open`), ask the question once (the default answer mode, completion form, 8 new
tokens, with sources: its memory() loads, checksums and every search), and once more; peak RSS
of that process. --no-prepare leaves the kept shares out (the first answer computes them).
Stores stay in benchmarks/out/stores/open-SIZE-KIND (-DTYPE added for a source not in float16).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "out" / "stores"


def build(source_path: Path, target: Path, size: int, kind: str, noise: float) -> float:
    """Write the store of `size` tokens (see the module docstring); returns seconds."""
    from fot_memory_plugin.persistence import IndexParams, MemoryStore
    from fot_memory_plugin.persistence.kvfile import rows_float32

    started = time.perf_counter()
    with MemoryStore.open(source_path, readonly=True) as source:
        (record,) = source.documents()
        fingerprint = source.fingerprint
        window = fingerprint["memory_config"]["local_window"]
        kv = {layer: source.memory(layer, exact=True)._parts[0].kv for layer in record.layers}
        chunks = [(c.start_token, c.end_token, c.start_char, c.end_char, c.text) for c in source.chunks(record.id)]
        rng = np.random.default_rng(0)
        with MemoryStore.open(target, fingerprint=fingerprint) as store:
            copy, written = 0, 0
            while written < size:
                tokens = min(record.num_tokens, size - written)
                name = record.name if copy == 0 else f"{record.name} (noisy copy {copy})"
                with store.begin_document(name, sha256=f"{record.sha256}-{copy}", text_length=record.text_length,
                                          dtype=record.dtype, index_params=IndexParams(kind=kind)) as writer:
                    for layer in record.layers:
                        std = rows_float32(kv[layer][: min(tokens, 16384)], record.dtype).std(0)  # (2, Hkv, D)
                        for start in range(0, tokens, window):
                            rows = rows_float32(kv[layer][start : min(start + window, tokens)], record.dtype).numpy()
                            if copy:
                                rows = rows + noise * std.numpy() * rng.standard_normal(rows.shape, np.float32)
                            writer.append(layer, rows[:, 0].transpose(1, 0, 2), rows[:, 1].transpose(1, 0, 2))
                    writer.add_chunks(chunk for chunk in chunks if chunk[1] <= tokens)
                written += tokens
                copy += 1
    return time.perf_counter() - started


def prepare(path: Path, keep: bool) -> None:
    """In THIS process: keep the baseline shares in the store as a read does (or drop them)."""
    from fot_memory_plugin.documents.document_memory import DocumentMemory

    with DocumentMemory.open(path) as memory:
        memory.store._meta.db.execute("DELETE FROM derived")  # a store kept from an earlier run
        memory.store._meta.db.conn.commit()
        if keep:
            memory.prepare_answers()


def measure(path: Path, question: str) -> dict:
    """In THIS process (a fresh one): open, first and second answer, peak RSS."""
    import torch

    from fot_memory_plugin.documents.document_memory import DocumentMemory

    with torch.no_grad():
        started = time.perf_counter()
        memory = DocumentMemory.open(path, readonly=True)
        opened = time.perf_counter()
        first = memory.ask(question, chat=False, max_new_tokens=8)
        answered = time.perf_counter()
        memory.ask(question, chat=False, max_new_tokens=8)
        again = time.perf_counter()
        tokens = sum(record.num_tokens for record in memory.store.documents())
        memory.close()
    return {"tokens": tokens, "open_s": opened - started, "first_answer_s": answered - opened,
            "second_answer_s": again - answered, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "answer": first.text, "first_source": first.sources[0].text[:80] if first.sources else None}


def store_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, nargs="?")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["clusters", "hnsw"])
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--question", default="The village of Longbourn was only one mile from")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--no-prepare", action="store_true", help="measure without the kept baseline shares")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # the fresh child process
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)  # the preparing child process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.question)))
        return
    if args.prepare:
        prepare(args.prepare, keep=not args.no_prepare)
        return
    if args.source is None:
        parser.error("give the SOURCE_STORE holding one real document")
    from fot_memory_plugin.persistence import MemoryStore

    with MemoryStore.open(args.source, readonly=True) as source:
        (dtype,) = {record.dtype for record in source.documents()}
    rows = []
    for size in args.sizes:
        for kind in args.kinds:
            target = OUT / (f"open-{size}-{kind}" + ("" if dtype == "float16" else f"-{dtype}"))  # the source's dtype
            built = None
            if args.rebuild or not (target / "memory.sqlite").exists():
                built = build(args.source, target, size, kind, args.noise)
            subprocess.run([sys.executable, __file__, "--prepare", str(target)] + ["--no-prepare"] * args.no_prepare,
                           check=True, capture_output=True)
            output = subprocess.run([sys.executable, __file__, "--measure", str(target), "--question", args.question],
                                    check=True, capture_output=True, text=True).stdout
            result = json.loads(output.splitlines()[-1])
            rows.append([f"{size:,}", kind if dtype == "float16" else f"{kind}, {dtype}", f"{store_bytes(target) / result['tokens'] / 1000:.2f}",
                         "-" if built is None else f"{built:.0f}", f"{result['open_s']:.2f}",
                         f"**{result['first_answer_s']:.2f}**", f"{result['second_answer_s']:.2f}",
                         f"{result['peak_rss_gib']:.2f}", repr(result["answer"]), repr(result["first_source"])])
            print(rows[-1], flush=True)
    header = ["tokens", "index", "KB / token", "build s", "open s (store + model)", "first answer s",
              "second answer s", "peak RSS GiB", "answer", "first source"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(map(str, row)) + " |" for row in rows))


if __name__ == "__main__":
    main()
