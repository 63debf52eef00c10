"""Generation latency with memory in the persistent store (~100k and ~1M tokens) vs no memory.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_latency.py
    # = --sizes 100000 1000000 --layers 0 15 29 --layers-1m 15 --base-tokens 16896 --noise 0.1
    #   --prompt-tokens 128 --new-tokens 16 --repeats 3 --exact-sizes 100000

What is real and what is not:
- Keys and values are REAL SmolLM2-135M keys/values of the first `base-tokens` tokens of
  Persuasion (the reading store_recall.py caches), TILED to 100k / 1M tokens: copy 0 is the
  reading itself, every further copy adds gaussian noise of `noise` x the per-dimension standard
  deviation of that layer's keys (values likewise). Indexes are built with the store's defaults.
- The stores hold only a few layers (`--layers` at 100k, `--layers-1m` at 1M): 30 layers x 3 KV
  heads of 100k-token hnswlib indexes take ~1 h to build on 2 cores and ~3.6 GB of RAM, 1M ~10x.
- Measured end to end: the real model generating `new-tokens` tokens greedily after a real
  `prompt-tokens` prompt, (a) with memory in just the stored layers, and (b) with memory in ALL
  30 layers where layer l retrieves from the stored layer nearest to l ("aliased": 30 real
  searches of a store of that size per token, over another layer's keys for most layers).
  Extrapolated: no-memory ms/token + 30 x the per-layer cost measured in (a).
- Per-layer search ms: the store's search call for one decode step (9 query heads), timed inside
  the generation of (a).
Prints a markdown table; stores stay in benchmarks/out/stores/ (store_size.py measures them).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

import _real_keys as rk
from fot_memory_plugin import ExactMemory, MemoryConfig, MemoryEngine
from fot_memory_plugin.memory import Memory
from fot_memory_plugin.persistence import MemoryStore

TILE_WINDOW = 4096  # tokens per writer.append: fewer, larger appends while building


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29], help="stored layers, sizes < 1M")
    parser.add_argument("--layers-1m", type=int, nargs="+", default=[15], help="stored layers, sizes >= 1M")
    parser.add_argument("--base-tokens", type=int, default=16896, help="real tokens read, then tiled")
    parser.add_argument("--noise", type=float, default=0.1, help="noise of tiled copies, x per-dim std")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="generations per variant (interleaved); medians")
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=[100_000], help="also exact in-RAM memory")
    parser.add_argument("--rebuild", action="store_true")
    return parser.parse_args()


# ---- tiled stores ---------------------------------------------------------------------------


def tiled_windows(reading: rk.Reading, layers: list[int], base: int, size: int, noise: float,
                  start: int = 0) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Windows of `size` tokens tiled from the first `base` real tokens; copies after the first are noisy.

    Deterministic per window (seeded by its start), so the in-RAM exact memory gets the same data.
    """
    spread = {layer: (reading.keys[layer][:, :base].float().std(dim=1, keepdim=True),
                      reading.values[layer][:, :base].float().std(dim=1, keepdim=True)) for layer in layers}
    for begin in range(start, size, TILE_WINDOW):
        positions = torch.arange(begin, min(begin + TILE_WINDOW, size))
        noisy = (positions >= base).float()[None, :, None]  # copy 0 is the reading itself
        generator = torch.Generator().manual_seed(begin)
        window = {}
        for layer in layers:
            keys, values = (tensor[:, :base][:, positions % base].float() for tensor in
                            (reading.keys[layer], reading.values[layer]))
            key_std, value_std = spread[layer]
            keys += noise * key_std * noisy * torch.randn(keys.shape, generator=generator)
            values += noise * value_std * noisy * torch.randn(values.shape, generator=generator)
            window[layer] = (keys, values)
        yield window


def build_tiled(args: argparse.Namespace, loaded, config: MemoryConfig, reading: rk.Reading,
                size: int, layers: list[int]) -> rk.BuiltStore:
    name = f"tiled-{size}-L{'-'.join(map(str, layers))}-noise{args.noise:g}"
    built = rk.build_store(rk.STORES / name, rk.fingerprint(loaded, config, layers),
                           tiled_windows(reading, layers, args.base_tokens, size, args.noise),
                           num_tokens=size, rebuild=args.rebuild)
    if built.commit_seconds is not None:
        print(f"built {name}: append {built.append_seconds:.0f} s, commit (hnswlib indexes) "
              f"{built.commit_seconds:.0f} s = {size * len(layers) / built.commit_seconds:.0f} token-layers/s")
    return built


def exact_memories(args: argparse.Namespace, reading: rk.Reading, size: int, layers: list[int]) -> dict[int, Memory]:
    """The same tiled tokens in exact in-RAM memories (float32)."""
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in layers}
    for window in tiled_windows(reading, layers, args.base_tokens, size, args.noise):
        for layer, pair in window.items():
            parts[layer].append(pair)
    memories: dict[int, Memory] = {}
    for layer in layers:
        pairs = parts.pop(layer)  # one append of the whole memory: no growth copies
        memory = ExactMemory()
        memory.append(torch.cat([k for k, _ in pairs], dim=1)[None], torch.cat([v for _, v in pairs], dim=1)[None])
        memories[layer] = memory
    return memories


# ---- timing generation ----------------------------------------------------------------------


class _Clock(BaseStreamer):
    """Timestamps every put(): the prompt first, then each generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class Variant:
    name: str
    tokens: int  # tokens in memory (0: none)
    memories: Mapping[int, Memory] | None  # None: the plain model
    stored_layers: int  # distinct memories searched per token
    aliased: bool = False


@dataclass
class Timing:
    first_token_s: list[float]
    ms_per_token: list[float]
    search_ms: list[float]  # one decode step of one layer


def generate_once(model, tokenizer, variant: Variant, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[float]]:
    """(seconds to the first token, median ms per later token, per-layer decode search ms) of one generation."""
    memories = {layer: rk.InstrumentedMemory(memory) for layer, memory in (variant.memories or {}).items()}
    config = MemoryConfig(mem_layers=tuple(sorted(memories)) or None)
    engine = MemoryEngine(model, tokenizer, config, memories=memories or None)
    clock = _Clock()
    try:
        if variant.memories is None:
            with engine.detached():
                engine.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
        else:
            engine.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
    finally:
        engine.close()
    gaps = [1e3 * (b - a) for a, b in zip(clock.times[1:], clock.times[2:])]
    searches = [1e3 * seconds for memory in memories.values() for length, seconds in memory.searches if length == 1]
    return clock.times[1] - clock.times[0], statistics.median(gaps), searches


def measure(model, tokenizer, variants: list[Variant], prompt: torch.Tensor, args: argparse.Namespace) -> dict[str, Timing]:
    """Interleaved repeats (a slow moment of the machine hits every variant alike); medians later."""
    timings = {variant.name: Timing([], [], []) for variant in variants}
    generate_once(model, tokenizer, variants[0], prompt, 2)  # warm-up
    for _ in range(args.repeats):
        for variant in variants:
            first, per_token, searches = generate_once(model, tokenizer, variant, prompt, args.new_tokens)
            timing = timings[variant.name]
            timing.first_token_s.append(first)
            timing.ms_per_token.append(per_token)
            timing.search_ms.extend(searches)
    return timings


# ---- variants and the table -----------------------------------------------------------------


def aliased(memories: Mapping[int, Memory], num_layers: int) -> dict[int, Memory]:
    """Every layer retrieves from the stored layer nearest to it."""
    stored = sorted(memories)
    return {layer: memories[min(stored, key=lambda s: abs(s - layer))] for layer in range(num_layers)}


def variants_for(size: int, kind: str, memories: dict[int, Memory], num_layers: int) -> list[Variant]:
    label = f"{size // 1000}k" if size < 1_000_000 else f"{size / 1e6:g}M"
    return [Variant(f"{kind} {label}, {len(memories)} layers", size, memories, len(memories)),
            Variant(f"{kind} {label}, all {num_layers} layers (aliased)", size, aliased(memories, num_layers),
                    len(memories), aliased=True)]


def table(variants: list[Variant], timings: dict[str, Timing], num_layers: int) -> str:
    base = statistics.median(timings["no memory"].ms_per_token)
    header = ["variant", "memory layers", "first token s", "ms/token", "x no memory",
              "search ms / layer / token", f"ms/token extrapolated to {num_layers} layers", "x no memory"]
    rows = []
    for variant in variants:
        timing = timings[variant.name]
        ms = statistics.median(timing.ms_per_token)
        layers = len(variant.memories or {})
        search = f"{statistics.median(timing.search_ms):.2f}" if timing.search_ms else "-"
        if variant.memories and not variant.aliased:
            projected = base + num_layers * (ms - base) / layers
            extrapolated = [f"{projected:.0f}", f"{projected / base:.2f}"]
        else:
            extrapolated = ["-", "-"]
        rows.append([variant.name, layers or "-", f"{statistics.median(timing.first_token_s):.2f}",
                     f"{ms:.1f}", f"{ms / base:.2f}", search, *extrapolated])
    return rk.markdown_table(header, rows)


def main() -> None:
    args = parse_args()
    config = MemoryConfig()
    loaded, engine = rk.load_engine(config)
    num_layers = len(engine.layers)
    reading = rk.read_book(engine, args.base_tokens)
    ids = rk.book_ids(engine)
    prompt = rk.prompts(engine, ids, after=reading.num_tokens, length=args.prompt_tokens)[1][1]
    engine.close()
    variants = [Variant("no memory", 0, None, 0)]
    stores = []
    for size in args.sizes:
        layers = args.layers_1m if size >= 1_000_000 else args.layers
        built = build_tiled(args, loaded, config, reading, size, layers)
        store = MemoryStore.open(built.path, readonly=True)
        stores.append(store)
        if size in args.exact_sizes:
            variants += variants_for(size, "exact in-RAM", exact_memories(args, reading, size, layers), num_layers)
        hnsw = {layer: store.memory(layer) for layer in layers}  # exact=False: hnswlib, default ef
        variants += variants_for(size, "store HNSW", hnsw, num_layers)
    timings = measure(loaded.model, loaded.tokenizer, variants, prompt, args)
    print(f"\nSmolLM2-135M float32, {torch.get_num_threads()} threads; prompt {prompt.shape[1]} tokens, "
          f"{args.new_tokens} new tokens greedy, top_k 32 (store ef = 64), median of {args.repeats}; memory: "
          f"{args.base_tokens} real tokens tiled with noise {args.noise:g}\n")
    print(table(variants, timings, num_layers))
    for store in stores:
        store.close()


if __name__ == "__main__":
    main()
