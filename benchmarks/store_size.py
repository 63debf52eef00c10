"""Bytes on disk per token of the benchmark stores, and the time to reopen each in a fresh process.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_size.py
    # run store_recall.py and/or store_latency.py first: they leave their stores in benchmarks/out/stores/

For every store under benchmarks/out/stores/: bytes per token per stored layer, split into the
key/value files (.kv), the hnswlib indexes (.hnsw) and SQLite, and the per-token size projected
to a store with all 30 layers of SmolLM2-135M. Then, per store and verify mode, in a fresh
process: the time to import the store package (torch included), `MemoryStore.open`,
`store.memory(layer)` for every stored layer (checksums and hnswlib index loads) and one
decode-step search (random query, 9 heads, k=32). The page cache is warm (the files were just
written or read); a cold disk adds the time to read the files.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MODEL_LAYERS = 30  # SmolLM2-135M
STORES = Path(__file__).resolve().parent / "out" / "stores"  # where the other store benchmarks leave theirs


@dataclass
class StoreSize:
    path: Path
    tokens: int
    layers: int
    kv: int  # bytes of .kv files
    hnsw: int  # bytes of hnswlib indexes
    sqlite: int  # memory.sqlite and its -wal / -shm
    other: int

    @property
    def total(self) -> int:
        return self.kv + self.hnsw + self.sqlite + self.other


def measure_size(path: Path) -> StoreSize:
    from fot_memory_plugin.persistence import MemoryStore

    with MemoryStore.open(path, readonly=True) as store:
        records = store.documents()
    sizes = {"kv": 0, "hnsw": 0, "sqlite": 0, "other": 0}
    for file in path.rglob("*"):
        if file.is_file():
            kind = file.suffix[1:] if file.suffix in (".kv", ".hnsw") else "other"
            kind = "sqlite" if "sqlite" in file.name else kind
            sizes[kind] += file.stat().st_size
    layers = max((len(record.layers) for record in records), default=0)
    return StoreSize(path, sum(record.num_tokens for record in records), layers, **sizes)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    # Imported here, not at the top: the --reopen child must not pay for the model stack.
    from _real_keys import markdown_table as table

    return table(header, rows)


def size_table(stores: list[StoreSize]) -> str:
    header = ["store", "tokens", "layers", "kv B/token/layer", "hnsw B/token/layer", "sqlite B/token",
              "total MiB", f"projected KiB/token, {MODEL_LAYERS} layers"]
    rows = []
    for store in stores:
        per_layer = (store.kv + store.hnsw) / (store.tokens * store.layers)
        projected = (MODEL_LAYERS * per_layer + (store.sqlite + store.other) / store.tokens) / 1024
        rows.append([store.path.name, store.tokens, store.layers, f"{store.kv / (store.tokens * store.layers):.0f}",
                     f"{store.hnsw / (store.tokens * store.layers):.0f}", f"{store.sqlite / store.tokens:.2f}",
                     f"{store.total / 2**20:.0f}", f"{projected:.1f}"])
    return markdown_table(header, rows)


def reopen(path: Path, verify: str) -> dict[str, float]:
    """In THIS process (call it in a fresh one): timed import, open, memory() per layer, one search."""
    started = time.perf_counter()
    import torch

    from fot_memory_plugin.persistence import MemoryStore

    imported = time.perf_counter()
    store = MemoryStore.open(path, readonly=True, verify=verify)
    opened = time.perf_counter()
    layers = store.documents()[0].layers
    memories = [store.memory(layer) for layer in layers]
    loaded = time.perf_counter()
    record = store.documents()[0]
    query = torch.randn(1, (store.fingerprint or {}).get("num_heads", record.kv_heads), 1, record.head_dim)
    memories[0].search(query, 32)
    searched = time.perf_counter()
    store.close()
    return {"import_s": imported - started, "open_s": opened - imported, "memory_all_layers_s": loaded - opened,
            "layers": len(layers), "first_search_ms": 1e3 * (searched - loaded)}


def reopen_table(stores: list[StoreSize]) -> str:
    header = ["store", "GiB", "verify", "import s", "open s", "memory() all layers s", "s per layer",
              f"projected s, {MODEL_LAYERS} layers", "first search ms"]
    rows = []
    for store in stores:
        for verify in ("full", "size"):
            timing = reopen_in_fresh_process(store.path, verify)
            per_layer = timing["memory_all_layers_s"] / timing["layers"]
            rows.append([store.path.name, f"{store.total / 2**30:.2f}", verify, f"{timing['import_s']:.2f}",
                         f"{timing['open_s']:.3f}", f"{timing['memory_all_layers_s']:.2f}", f"{per_layer:.2f}",
                         f"{MODEL_LAYERS * per_layer:.0f}", f"{timing['first_search_ms']:.1f}"])
    return markdown_table(header, rows)


def reopen_in_fresh_process(path: Path, verify: str) -> dict[str, float]:
    output = subprocess.run([sys.executable, __file__, "--reopen", str(path), "--verify", verify],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", type=Path, default=STORES)
    parser.add_argument("--reopen", type=Path, help=argparse.SUPPRESS)  # the fresh child process
    parser.add_argument("--verify", default="full", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reopen:
        print(json.dumps(reopen(args.reopen, args.verify)))
        return
    stores = [measure_size(path) for path in sorted(args.stores.iterdir()) if (path / "memory.sqlite").exists()]
    stores = [store for store in stores if store.tokens]
    if not stores:
        sys.exit(f"No stores under {args.stores}: run store_recall.py or store_latency.py first.")
    print(size_table(stores))
    print("\nreopen, a fresh process each (warm page cache):\n")
    print(reopen_table(stores))

if __name__ == "__main__":
    main()
