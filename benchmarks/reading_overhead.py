"""Reading overhead: the plain model forward vs reading into in-RAM memory vs reading into the
persistent store, over the same windows of a real book, variants interleaved in one process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reading_overhead.py
    # = --tokens 8192 --repeats 2 --book persuasion.txt (SmolLM2-135M float32, store defaults)

Variants (memory in all 30 layers, or a FoT model's own layers; local window 512, top_k 32,
float16 memory as the store keeps):
  plain                 the unpatched decoder over the windows (no memory at all)
  RAM, no retrieval     memory reading that appends each window's keys/values, retrieving nothing
  store, no retrieval   the same, each window also written to a store document (DocumentWriter):
                        .kv writes and hnswlib inserts run on the writer's background thread,
                        then the commit (rest of the indexes, saves, fsyncs, SQLite)
  RAM, retrieval        the default reading: exact top-k from the in-RAM memory in every layer
  store, retrieval      what `DocumentMemory.read_text` (`fot-memory read`) does: the default
                        reading plus the store writes
With several --writer-threads, one store variant per count (the store's layers spread over
that many background threads: what `fot-memory read --device cuda` does, where the hnswlib
inserts, not the model, limit reading). "store" times include the commit; the table also shows
the commit alone (what remains after the last window). A fresh store per run. Best of `repeats`
(another process on the machine only adds); CPU s is the process's CPU time over all its
threads, which other processes do not stretch.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import _real_keys as rk
from fot_memory_plugin import MemoryEngine
from fot_memory_plugin.documents.document_memory import STORE_DEFAULTS
from fot_memory_plugin.persistence import MemoryStore


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (memory in all 30 layers) or 'smollm2-fot' (its 5)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--book", type=Path, default=rk.BOOK)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); with 1 on 2 cores the "
                        "writer's background thread has a core of its own")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--writer-threads", type=int, nargs="+", default=[1],
                        help="store writer threads; one store variant per value (more pay when the model is on a GPU)")
    return parser.parse_args()


@torch.no_grad()
def plain(engine: MemoryEngine, ids: torch.Tensor) -> dict[str, float]:
    window = engine.config.local_window
    started = time.perf_counter()
    with engine.detached() as model:
        for start in range(0, ids.shape[1], window):
            model.model(input_ids=ids[:, start : start + window].to(engine.device), use_cache=False)
    _synchronize(engine)
    return {"total": time.perf_counter() - started}


def _synchronize(engine: MemoryEngine) -> None:
    """Wait for queued GPU work, so a timing covers it."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def in_ram(engine: MemoryEngine, ids: torch.Tensor, retrieve: bool) -> dict[str, float]:
    engine.reset()
    started = time.perf_counter()
    engine.read(ids, retrieve=retrieve)
    _synchronize(engine)
    seconds = time.perf_counter() - started
    engine.reset()
    return {"total": seconds}


def to_store(engine: MemoryEngine, ids: torch.Tensor, retrieve: bool, fingerprint: dict,
             threads: int = 1) -> dict[str, float]:
    """DocumentMemory.read_text's reading path (begin_document, read with on_window, commit)."""
    rk.OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=rk.OUT) as directory:
        with MemoryStore.open(directory, fingerprint=fingerprint) as store:
            engine.reset()
            started = time.perf_counter()
            digest = hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
            with store.begin_document("book", sha256=digest, text_length=ids.shape[1], dtype="float16",
                                      threads=threads) as writer:

                def write(start: int, end: int, captured: rk.Window) -> None:
                    for layer, (keys, values) in captured.items():
                        writer.append(layer, keys[0], values[0])  # (Hkv, T, D)

                engine.read(ids, retrieve=retrieve, on_window=write)
                read = time.perf_counter()
            finished = time.perf_counter()
            engine.reset()
    return {"total": finished - started, "commit": finished - read}


def _with_cpu_time(run: Callable[[torch.Tensor], dict[str, float]]) -> Callable[[torch.Tensor], dict[str, float]]:
    """Adds "cpu": CPU seconds of this process, all threads (other processes on a shared machine
    stretch wall time, not this)."""

    def timed(ids: torch.Tensor) -> dict[str, float]:
        started = time.process_time()
        result = run(ids)
        return {**result, "cpu": time.process_time() - started}

    return timed


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = STORE_DEFAULTS.replace(retrieval="exact")  # reading retrieves from RAM in both cases
    loaded, engine = rk.load_engine(config, model=args.model, device=args.device)
    fingerprint = rk.fingerprint(loaded, config, engine.layers)
    book_ids = rk.book_ids(engine, args.book)[None]
    engine.read(book_ids[:, : config.local_window])  # warm-up
    variants: list[tuple[str, Callable[[torch.Tensor], dict[str, float]]]] = [("plain", lambda ids: plain(engine, ids))]
    for retrieve, kind in ((False, "no retrieval"), (True, "retrieval")):
        variants.append((f"RAM, {kind}", lambda ids, retrieve=retrieve: in_ram(engine, ids, retrieve)))
        for threads in args.writer_threads:
            name = f"store, {kind}" + ("" if args.writer_threads == [1] else f", {threads} writer threads")
            variants.append((name, lambda ids, retrieve=retrieve, threads=threads:
                             to_store(engine, ids, retrieve, fingerprint, threads)))
    variants = [(name, _with_cpu_time(run)) for name, run in variants]
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for tokens in args.tokens:
        ids = book_ids[:, :tokens]
        for repeat in range(args.repeats):
            for name, run in variants:
                results.setdefault((tokens, name), []).append(run(ids))
                print(f"{tokens} tokens, repeat {repeat + 1}, {name}: {results[tokens, name][-1]}", flush=True)
    print(f"\nSmolLM2-135M float32 on {engine.device}, {torch.get_num_threads()} torch threads, memory in {len(engine.layers)} layers, "
          f"window {config.local_window}, top_k {config.top_k}, {args.book.name}; best of {args.repeats}\n")
    header = ["tokens", "variant", "wall s", "tokens/s", "x plain", "x RAM (same retrieval)", "commit s",
              "CPU s", "CPU x plain", "CPU x RAM"]
    rows = []
    for tokens in args.tokens:
        best = {name: min(results[tokens, name], key=lambda r: r["total"]) for name, _ in variants}
        cpu = {name: min(r["cpu"] for r in results[tokens, name]) for name, _ in variants}
        for name, _ in variants:
            seconds = best[name]["total"]
            ram = "RAM, " + name.split(", ")[1] if name.startswith("store") else None
            rows.append([tokens, name, f"{seconds:.1f}", f"{tokens / seconds:.0f}",
                         f"{seconds / best['plain']['total']:.2f}",
                         "-" if ram is None else f"{seconds / best[ram]['total']:.2f}",
                         f"{best[name]['commit']:.1f}" if "commit" in best[name] else "-",
                         f"{cpu[name]:.1f}", f"{cpu[name] / cpu['plain']:.2f}",
                         "-" if ram is None else f"{cpu[name] / cpu[ram]:.2f}"])
    print(rk.markdown_table(header, rows))
    engine.close()


if __name__ == "__main__":
    main()
