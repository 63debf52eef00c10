"""Ray on this machine: distributed reading with 1 vs 2 workers, and a 2-shard actor memory vs the
local store, measured side by side in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ray_scaling.py
    # = --model smollm2-fot --opening-chars 6000 --memory-tokens 100000 --base-tokens 4096 --noise 0.1
    #   --prompt-tokens 128 --new-tokens 16 --repeats 3 --threads 1

1. Reading: the openings (first `opening-chars` characters) of the six Austen novels in
   ../shared/data/books, read into a new store (a) serially in this process (2 torch threads),
   (b) by read_corpus with ONE Ray worker at a time (num_cpus_per_task=2: one task holds both
   cores) with 2 torch threads, (c) the same with 1 torch thread, (d) with TWO workers
   (num_cpus_per_task=1: two tasks at once, 1 torch thread each).
   Wall time includes Ray's worker start-up and each task's model load; the driver's import cost
   per document is the copy + checksum + fsync + rename + SQLite row of `import_document`.
2. Searching: a store of `memory-tokens` tokens in two documents (the model's memory layers;
   REAL keys/values of the first `base-tokens` tokens of Persuasion read by the model, tiled with
   gaussian noise of `noise` x the per-dimension std, as store_latency.py does), searched through
   hnswlib while the model generates `new-tokens` tokens after a real prompt: no memory, the
   local store, the same store split into 2 shards served by 2 Ray actors (per-document merge,
   the exact default; and merge_in_shards). Per token: ms (median inter-token gap, best of
   `repeats` interleaved runs), search ms per layer, bytes crossing the actor boundary, and each
   shard actor's resident memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local cluster on loopback only

import torch  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import _real_keys as rk  # noqa: E402
from fot_memory_plugin import MemoryConfig, MemoryEngine  # noqa: E402
from fot_memory_plugin.documents.document_memory import STORE_DEFAULTS, DocumentMemory  # noqa: E402
from fot_memory_plugin.persistence import MemoryStore  # noqa: E402

BOOKS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]
OUT = rk.OUT / "ray"
TILE = 4096  # tokens per append while building the search store


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-fot")
    parser.add_argument("--opening-chars", type=int, default=6000)
    parser.add_argument("--memory-tokens", type=int, default=100_000)
    parser.add_argument("--base-tokens", type=int, default=4096)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the generating process and of each shard")
    parser.add_argument("--skip-reading", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    return parser.parse_args()


# ---- 1. reading ------------------------------------------------------------------------------

def openings(chars: int) -> list[Path]:
    directory = OUT / "openings"
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for book in BOOKS:
        text = (rk.BOOK.parent / f"{book}.txt").read_text(encoding="utf-8")[:chars]
        path = directory / f"{book}.txt"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


def read_serially(paths: list[Path], model: str) -> dict[str, Any]:
    torch.set_num_threads(2)
    started = time.perf_counter()
    with DocumentMemory.open(fresh(OUT / "read-serial"), model=model) as memory:
        for path in paths:
            memory.read_file(path)
        tokens = sum(record.num_tokens for record in memory.documents())
    return {"variant": "serial, this process (2 threads)", "wall_s": time.perf_counter() - started, "tokens": tokens}


def read_on_ray(paths: list[Path], model: str, cpus_per_task: int, threads: int) -> dict[str, Any]:
    from fot_memory_plugin.distributed import read_corpus

    store = fresh(OUT / f"read-ray-{cpus_per_task}cpu-{threads}threads")
    report = read_corpus(paths, store, model=model, num_cpus_per_task=cpus_per_task, threads_per_task=threads)
    report.raise_for_failures()
    workers = 2 // cpus_per_task
    with MemoryStore.open(store, readonly=True) as opened:
        sizes = [sum(f["size"] for f in record.files.values()) for record in opened.documents()]
    return {"variant": f"Ray, {workers} worker{'s' if workers > 1 else ''} ({threads} thread{'s' if threads > 1 else ''} each)",
            "wall_s": report.wall_s, "tokens": sum(t.tokens for t in report.timings),
            "read_s": sum(t.read_s for t in report.timings),
            "import_ms": statistics.mean(1000 * t.import_s for t in report.timings),
            "doc_mb": statistics.mean(sizes) / 1e6}


def reading(args: argparse.Namespace) -> None:
    paths = openings(args.opening_chars)
    rows = [read_serially(paths, args.model), read_on_ray(paths, args.model, 2, 2),
            read_on_ray(paths, args.model, 2, 1), read_on_ray(paths, args.model, 1, 1)]
    base = rows[0]["wall_s"]
    print(f"\n## Reading the openings ({args.opening_chars} chars) of {len(paths)} books, {args.model}, CPU\n")
    table = []
    for row in rows:
        table.append([row["variant"], row["tokens"], f"{row['wall_s']:.1f}", f"{row['tokens'] / row['wall_s']:.0f}",
                      f"{base / row['wall_s']:.2f}", f"{row.get('read_s', 0):.1f}" if "read_s" in row else "-",
                      f"{row['import_ms']:.0f} ({row['doc_mb']:.0f} MB)" if "import_ms" in row else "-"])
    print(rk.markdown_table(["variant", "tokens", "wall s", "tokens/s", "x serial", "sum of task read s",
                             "driver import ms / doc (doc size)"], table))
    print(f"\n2 workers vs 1 worker: {rows[1]['wall_s'] / rows[3]['wall_s']:.2f}x faster wall time (2 threads in the "
          f"one worker), {rows[2]['wall_s'] / rows[3]['wall_s']:.2f}x (1 thread in every worker); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


# ---- 2. searching ----------------------------------------------------------------------------

def tiled(reading: rk.Reading, layers: list[int], base: int, tokens: int, noise: float, doc: int):
    """Windows of TILE tokens tiled from the real reading, every copy noisy (seeded per doc and window)."""
    spread = {layer: (reading.keys[layer][:, :base].float().std(dim=1, keepdim=True),
                      reading.values[layer][:, :base].float().std(dim=1, keepdim=True)) for layer in layers}
    for begin in range(0, tokens, TILE):
        positions = torch.arange(begin, min(begin + TILE, tokens))
        generator = torch.Generator().manual_seed(doc * 10**7 + begin)
        window = {}
        for layer in layers:
            keys, values = (t[:, :base][:, positions % base].float() for t in (reading.keys[layer], reading.values[layer]))
            keys += noise * spread[layer][0] * torch.randn(keys.shape, generator=generator)
            values += noise * spread[layer][1] * torch.randn(values.shape, generator=generator)
            window[layer] = (keys, values)
        yield window


def search_store(args: argparse.Namespace, loaded: rk.LoadedModel, engine: MemoryEngine, reading: rk.Reading) -> Path:
    """The local store: two documents of memory-tokens / 2 tokens each (reused when it exists)."""
    path = OUT / f"search-{args.memory_tokens}-{args.model}-noise{args.noise:g}"
    half = args.memory_tokens // 2
    if (path / "memory.sqlite").exists():
        with MemoryStore.open(path, readonly=True) as store:
            if [r.num_tokens for r in store.documents()] == [half, half]:
                return path
    fresh(path)
    layers = list(engine.layers)
    started = time.perf_counter()
    with MemoryStore.open(path, fingerprint=rk.fingerprint(loaded, engine.config, layers)) as store:
        for doc in range(2):
            with store.begin_document(f"tiled-{doc}", sha256=f"tiled-{doc}-{half}", text_length=half,
                                      threads=2) as writer:
                for window in tiled(reading, layers, args.base_tokens, half, args.noise, doc):
                    for layer, (keys, values) in window.items():
                        writer.append(layer, keys, values)
    print(f"built {path.name} in {time.perf_counter() - started:.0f} s")
    return path


class _Clock(BaseStreamer):
    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class _Timed:
    """A memory whose search calls are timed (the same object underneath)."""

    def __init__(self, memory: Any, spent: list[float], kept: list | None = None) -> None:
        self._memory, self._spent, self._kept = memory, spent, kept

    def __len__(self) -> int:
        return len(self._memory)

    def search(self, queries: torch.Tensor, k: int):
        started = time.perf_counter()
        hits = self._memory.search(queries, k)
        self._spent.append(time.perf_counter() - started)
        if self._kept is not None and queries.shape[2] == 1:
            self._kept.append(queries.clone())
        return hits

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._memory.append(keys, values)


def per_token(engine: MemoryEngine, memories: dict | None, prompt: torch.Tensor, new_tokens: int,
              kept: dict | None = None) -> tuple[float, float]:
    """(median ms between generated tokens, mean search ms per layer per decode step); kept:
    {layer: []} collects that layer's decode-step queries."""
    spent: list[float] = []
    engine.reset({layer: _Timed(memory, spent, None if kept is None else kept[layer])
                  for layer, memory in memories.items()} if memories else None)
    clock = _Clock()
    engine.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
    engine.reset()
    gaps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # after the prompt and the first token
    decode = spent[-(new_tokens - 1) * len(engine.layers):] if spent else []
    return 1000 * statistics.median(gaps), (1000 * statistics.mean(decode) if decode else 0.0)


def searching(args: argparse.Namespace) -> None:
    from fot_memory_plugin.distributed import ShardedStore, shard_store

    torch.set_num_threads(args.threads)
    loaded, engine = rk.load_engine(STORE_DEFAULTS.replace(retrieval="hnsw"), model=args.model)
    reading = rk.read_book(engine, args.base_tokens)
    local_path = search_store(args, loaded, engine, reading)
    shards_path = fresh(OUT / f"{local_path.name}-2shards")
    started = time.perf_counter()
    catalog = shard_store(local_path, 2, shards_path)
    print(f"sharded into 2 in {time.perf_counter() - started:.1f} s")
    ids = rk.book_ids(engine)
    prompt = ids[args.base_tokens : args.base_tokens + args.prompt_tokens][None]
    with MemoryStore.open(local_path, readonly=True) as local, \
            ShardedStore.open(catalog, threads_per_shard=args.threads) as sharded:
        idle = sharded.shard_stats()
        variants = {
            "no memory": None,
            "local store": {layer: local.memory(layer) for layer in engine.layers},
            "2 shard actors": {layer: sharded.memory(layer) for layer in engine.layers},
            "2 shard actors, merge_in_shards": {layer: sharded.memory(layer, merge_in_shards=True)
                                                for layer in engine.layers},
        }
        for memories in variants.values():  # warm: indexes loaded, pages mapped, workers started
            per_token(engine, memories, prompt, 3)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, memories in variants.items():
                results[name].append(per_token(engine, memories, prompt, args.new_tokens))
        kept: dict = {layer: [] for layer in engine.layers}
        per_token(engine, variants["local store"], prompt, args.new_tokens, kept)
        isolated = {name: isolated_search_ms(memories, kept, engine.config.top_k)
                    for name, memories in variants.items() if memories}
        loaded_stats = sharded.shard_stats()
    report_search(args, engine, results, isolated, idle, loaded_stats)


def isolated_search_ms(memories: dict, kept: dict, k: int) -> float:
    """Median ms of one layer's search for the generation's real decode queries, nothing else running."""
    times = []
    for layer, queries in kept.items():
        for query in queries:
            started = time.perf_counter()
            memories[layer].search(query, k)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def wire_bytes(engine: MemoryEngine, docs_per_shard: int, shards: int, merged: bool) -> int:
    """Bytes crossing the actor boundary per generated token, all memory layers (payload only)."""
    config, model = engine.config, engine.model.config
    kv_heads, q_heads = model.num_key_value_heads, model.num_attention_heads
    dim = model.hidden_size // q_heads
    rows, k = q_heads, config.top_k  # (Hkv, R = Hq / Hkv x 1 position, D) per decode step
    out = shards * rows * dim * 4
    per_candidate = 4 + 8 + 2 * dim * (4 if merged else 2)  # score, id, key + value (float16 as stored)
    back = shards * (1 if merged else docs_per_shard) * rows * k * per_candidate
    return len(engine.layers) * (out + back)


def report_search(args: argparse.Namespace, engine: MemoryEngine, results: dict, isolated: dict, idle: list,
                  loaded: list) -> None:
    best = {name: min(runs) for name, runs in results.items()}
    local = best["local store"][0]
    layers = len(engine.layers)
    print(f"\n## Per-token latency at {args.memory_tokens} tokens, {args.model} ({layers} memory layers, "
          f"top_k {engine.config.top_k}), {args.threads} torch thread(s)\n")
    table = []
    for name, (ms, search_ms) in best.items():
        merged = "merge" in name
        wire = wire_bytes(engine, 1, 2, merged) if "shard" in name else 0
        table.append([name, f"{ms:.1f}", f"{ms / local:.2f}", f"{search_ms:.2f}" if search_ms else "-",
                      f"{isolated[name]:.2f}" if name in isolated else "-",
                      f"{(ms - local) / layers:+.2f}" if "shard" in name else "-",
                      f"{wire / 1024:.0f} KiB" if wire else "-"])
    print(rk.markdown_table(["variant", "ms/token", "x local store", "search ms / layer / token",
                             "same, searched alone",
                             "overhead ms / layer / token", "bytes over the wire / token"], table))
    print(f"\nnetwork overhead per token (2 shard actors / local store): "
          f"{best['2 shard actors'][0] / local:.2f}x; merge_in_shards {best['2 shard actors, merge_in_shards'][0] / local:.2f}x")
    alone = isolated["2 shard actors"] / isolated["local store"]
    print(f"one layer's search alone (2 shard actors / local store): {alone:.2f}x "
          f"({isolated['2 shard actors'] - isolated['local store']:+.2f} ms); load average {os.getloadavg()[0]:.1f}")
    print("\n| shard | documents | tokens | RSS opened | RSS after searching |\n|---|---|---|---|---|")
    for before, after in zip(idle, loaded):
        print(f"| {Path(after['path']).name} | {after['documents']} | {after['tokens']} | "
              f"{before['rss_bytes'] / 2**20:.0f} MiB | {after['rss_bytes'] / 2**20:.0f} MiB |")


def main() -> None:
    args = parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k in ("HF_HUB_OFFLINE", "FOT_MEMORY_CACHE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}})
    try:
        if not args.skip_reading:
            reading(args)
        if not args.skip_search:
            searching(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
