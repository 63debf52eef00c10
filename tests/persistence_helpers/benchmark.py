"""Measurements behind the store's defaults (not a test; minutes on 2 cores).

    PYTHONPATH=tests .venv/bin/python -m persistence_helpers.benchmark [recall|write|crossover|all]

recall:    recall@128 of hnswlib vs exact, by ef, on synthetic attention-like keys
write:     tokens/s of a SmolLM2-shaped write (30 layers x 3 KV heads x D=64): appends, commit;
           reopen time (open + memory() for all 30 layers, checksums included) and first search
crossover: ms per search, exact scan vs hnswlib, by document length and query length
Prints markdown tables (this is a script, so printing is its output).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from fot_memory_plugin.persistence import MemoryStore

from . import synth

K = 128


def _write(path: Path, name: str, seed: int, tokens: int, layers=synth.LAYERS, window: int = 512):
    fingerprint = synth.fingerprint(mem_layers=list(layers))
    with MemoryStore.open(path, fingerprint=fingerprint) as store:
        return synth.write_document(store, name, seed, tokens, layers=layers, window=window)


def recall_table() -> None:
    print("| keys N | " + " | ".join(f"ef={ef}" for ef in (128, 160, 192, 256, 384)) + " |")
    print("|---" * 6 + "|")
    for tokens in (6000, 50000):
        with tempfile.TemporaryDirectory() as tmp:
            _write(Path(tmp), "doc", 3, tokens)
            with MemoryStore.open(tmp, readonly=True) as store:
                query = synth.queries(5, 64)
                exact = store.memory(0, exact=True).search(query, K).token_ids[0].numpy()
                row = []
                for ef in (128, 160, 192, 256, 384):
                    found = store.memory(0, ef=ef, exact_below=0).search(query, K).token_ids[0].numpy()
                    row.append(f"{synth.recall(found, exact):.3f}")
        print(f"| {tokens} | " + " | ".join(row) + " |")


def write_table(tokens: int = 8192) -> None:
    layers = tuple(range(30))
    arrays = {layer: synth.doc_arrays(layer, tokens, layer % 2) for layer in layers}
    with tempfile.TemporaryDirectory() as tmp:
        fingerprint = synth.fingerprint(mem_layers=list(layers))
        with MemoryStore.open(tmp, fingerprint=fingerprint) as store:
            with store.begin_document("doc", sha256="x", text_length=tokens) as writer:
                started = time.perf_counter()
                for start in range(0, tokens, 512):
                    for layer in layers:
                        keys, values = arrays[layer]
                        writer.append(layer, keys[:, start : start + 512], values[:, start : start + 512])
                appended = time.perf_counter()
            committed = time.perf_counter()
            size = store.info()["bytes_on_disk"]
        opened = time.perf_counter()
        with MemoryStore.open(tmp, readonly=True) as store:
            memories = [store.memory(layer, exact_below=0) for layer in layers]
            loaded = time.perf_counter()
            query = synth.queries(1, 1)
            for memory in memories:
                memory.search(query, K)
            searched = time.perf_counter()
    print(f"{tokens} tokens x 30 layers x 3 heads x D=64, float16, {size / 2**20:.0f} MiB on disk")
    print(f"appends: {tokens / (appended - started):.0f} tokens/s; commit (fsync + 90 hnsw indexes): "
          f"{committed - appended:.1f} s; overall {tokens / (committed - started):.0f} tokens/s")
    print(f"reopen: open + memory() x 30 layers (CRC-32 + index loads) {loaded - opened:.2f} s; "
          f"one T=1 search in all 30 layers {1e3 * (searched - loaded):.0f} ms")


def crossover_table() -> None:
    print("| tokens | T | exact ms | hnsw ms |")
    print("|---|---|---|---|")
    for tokens in (1024, 4096, 16384, 65536):
        with tempfile.TemporaryDirectory() as tmp:
            _write(Path(tmp), "doc", 3, tokens, layers=(0,), window=4096)
            with MemoryStore.open(tmp, readonly=True) as store:
                exact, approx = store.memory(0, exact=True), store.memory(0, exact_below=0)
                for length in (1, 16, 128, 512):
                    query = synth.queries(2, length)
                    times = []
                    for memory in (exact, approx):
                        memory.search(query, K)
                        started = time.perf_counter()
                        repeats = 5 if length <= 16 else 2
                        for _ in range(repeats):
                            memory.search(query, K)
                        times.append(1e3 * (time.perf_counter() - started) / repeats)
                    print(f"| {tokens} | {length} | {times[0]:.1f} | {times[1]:.1f} |")


def main(argv: list[str]) -> None:
    which = argv[0] if argv else "all"
    for name, table in (("recall", recall_table), ("write", write_table), ("crossover", crossover_table)):
        if which in (name, "all"):
            table()


if __name__ == "__main__":
    np.random.seed(0)
    main(sys.argv[1:])
