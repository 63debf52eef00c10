"""Generation latency with memory in the persistent store (~100k and ~1M tokens) vs no memory.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_latency.py
    # = --sizes 100000 1000000 --layers 0 15 29 --layers-1m 15 --efs 64 512 --base-tokens 16896
    #   --noise 0.1 --prompt-tokens 128 --new-tokens 16 --repeats 3 --exact-sizes 100000

What is real and what is not:
- Keys and values are REAL SmolLM2-135M keys/values of the first `base-tokens` tokens of
  Persuasion (the reading store_recall.py caches), TILED to 100k / 1M tokens: copy 0 is the
  reading itself, every further copy adds gaussian noise of `noise` x the per-dimension standard
  deviation of that layer's keys (values likewise). Indexes are built with the store's defaults.
- The stores hold only a few layers (`--layers` at 100k, `--layers-1m` at 1M): 90 hnswlib
  indexes of 100k keys (30 layers x 3 KV heads) would take ~10 min to build here and ~3.6 GB of
  RAM to search, 1M ten times that.
- Measured end to end: the real model generating `new-tokens` tokens greedily after a real
  `prompt-tokens` prompt with memory in ALL 30 layers, where layer l retrieves from the stored
  layer nearest to l: 30 real searches of a store of that size per token, each layer over keys
  of the same size and kind, but for most layers another layer's keys (so their results are
  not what that layer would retrieve; the cost is the cost of a search).
- Search ms: the memory's search call for one decode step of one layer (9 query heads), timed
  inside the generation. Recall: the decode-step queries of the layers that search their own
  keys, searched again one step at a time, vs the store's exact scan of the same keys (ties count).
Prints a markdown table; stores stay in benchmarks/out/stores/ (store_size.py measures them).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

import _real_keys as rk
from fot_memory_plugin import ExactMemory, MemoryConfig, MemoryEngine, load_model
from fot_memory_plugin.core.memory import Memory
from fot_memory_plugin.persistence import MemoryStore, default_ef

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
    parser.add_argument("--repeats", type=int, default=3, help="generations per variant (interleaved); best of")
    parser.add_argument("--efs", type=int, nargs="+", default=[64, default_ef(MemoryConfig().top_k)],
                        help="store search ef (default: 64 and the store's default for the default top_k)")
    parser.add_argument("--exact-sizes", type=int, nargs="*", default=[100_000], help="also exact in-RAM memory")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--model", default="smollm2", help="the model that generates: 'smollm2' (memory in all 30 "
                        "layers) or 'smollm2-fot' (memory in its 5); stores always hold the base model's keys")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on an oversubscribed "
                        "machine, where every tiny op of a 2-thread pool waits for a descheduled thread")
    return parser.parse_args()


# ---- tiled stores ---------------------------------------------------------------------------


def tiled_windows(reading: rk.Reading, layers: list[int], base: int, size: int,
                  noise: float) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """Windows of `size` tokens tiled from the first `base` real tokens; copies after the first are noisy.

    Deterministic per window (seeded by its start), so the in-RAM exact memory gets the same data.
    """
    spread = {layer: (reading.keys[layer][:, :base].float().std(dim=1, keepdim=True),
                      reading.values[layer][:, :base].float().std(dim=1, keepdim=True)) for layer in layers}
    for begin in range(0, size, TILE_WINDOW):
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


def build_tiled(args: argparse.Namespace, loaded: rk.LoadedModel, config: MemoryConfig, reading: rk.Reading,
                size: int, layers: list[int]) -> rk.BuiltStore:
    name = f"tiled-{size}-L{'-'.join(map(str, layers))}-noise{args.noise:g}"
    built = rk.build_store(rk.STORES / name, rk.fingerprint(loaded, config, layers),
                           tiled_windows(reading, layers, args.base_tokens, size, args.noise),
                           num_tokens=size, rebuild=args.rebuild)
    if built.commit_seconds is not None:
        seconds = built.append_seconds + built.commit_seconds
        print(f"built {name}: appends (hnswlib indexes grow meanwhile) {built.append_seconds:.0f} s + commit "
              f"{built.commit_seconds:.0f} s = {size * len(layers) / seconds:.0f} token-layers/s")
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
    memories: Mapping[int, Memory] | None  # per model layer; None: the plain model
    reference: Mapping[int, Memory] | None = None  # exact search over the stored layers' keys, for recall


@dataclass
class Timing:
    first_token_s: list[float] = field(default_factory=list)
    ms_per_token: list[float] = field(default_factory=list)
    search_ms: list[float] = field(default_factory=list)  # one decode step of one layer
    decode_queries: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # (1, Hq, 1, D) per layer
    fallbacks: int = 0  # per-KV-head hnswlib searches that failed (the store then scanned exactly)


def generate_once(model: torch.nn.Module, tokenizer: Any, variant: Variant, prompt: torch.Tensor, new_tokens: int,
                  timing: Timing, counter: rk.FallbackCounter) -> None:
    """Generate once, adding the time to the first token, the median ms per later token and the
    per-layer decode search times to `timing`."""
    keep = variant.reference or {}  # queries of the layers that search their own keys
    memories = {layer: rk.InstrumentedMemory(memory, keep_queries=layer in keep)
                for layer, memory in (variant.memories or {}).items()}
    engine = MemoryEngine(model, tokenizer, MemoryConfig(mem_layers=tuple(sorted(memories)) or None),
                          memories=memories or None)
    clock, failed_before = _Clock(), counter.count
    try:
        with engine.detached() if variant.memories is None else contextlib.nullcontext():
            engine.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=clock)
    finally:
        engine.close()
    gaps = [1e3 * (later - earlier) for earlier, later in zip(clock.times[1:], clock.times[2:])]
    timing.first_token_s.append(clock.times[1] - clock.times[0])
    timing.ms_per_token.append(statistics.median(gaps))
    timing.fallbacks += counter.count - failed_before
    for layer, memory in memories.items():
        timing.search_ms += [1e3 * seconds for length, seconds in memory.searches if length == 1]
        if memory.keep_queries:
            timing.decode_queries.setdefault(layer, []).extend(q for q in memory.queries if q.shape[2] == 1)


def measure(model: torch.nn.Module, tokenizer: Any, variants: list[Variant], prompt: torch.Tensor,
            args: argparse.Namespace, counter: rk.FallbackCounter) -> dict[str, Timing]:
    """Interleaved repeats (a slow moment of the machine hits every variant alike)."""
    timings = {variant.name: Timing() for variant in variants}
    generate_once(model, tokenizer, variants[0], prompt, 2, Timing(), counter)  # warm-up
    for _ in range(args.repeats):
        for variant in variants:
            generate_once(model, tokenizer, variant, prompt, args.new_tokens, timings[variant.name], counter)
    return timings


def recall_in_situ(variant: Variant, timing: Timing, k: int) -> float | None:
    """Recall@k of the searches made while decoding, against exact search over the same keys."""
    if variant.reference is None or not timing.decode_queries:
        return None
    recalls = []
    for layer, queries in timing.decode_queries.items():
        batch = torch.cat(queries, dim=2)  # (1, Hq, steps, D)
        # One step per search, as decoding searched (a failed hnswlib search falls back per call).
        hits = [variant.memories[layer].search(query, k).keys for query in queries]
        found = rk.hit_scores(batch, torch.cat(hits, dim=2))
        exact = rk.hit_scores(batch, variant.reference[layer].search(batch, k).keys)
        recalls.append(rk.recall_at_k(found, exact).mean().item())
    return statistics.mean(recalls)


# ---- variants and the table -----------------------------------------------------------------


def aliased(memories: Mapping[int, Memory], mem_layers: Sequence[int]) -> dict[int, Memory]:
    """Every memory layer retrieves from the stored layer nearest to it (a stored layer from its own keys)."""
    stored = sorted(memories)
    return {layer: memories[min(stored, key=lambda s: abs(s - layer))] for layer in mem_layers}


def size_label(size: int) -> str:
    return f"{size // 1000}k" if size < 1_000_000 else f"{size / 1e6:g}M"


def store_variants(store: MemoryStore, size: int, layers: list[int], efs: list[int], mem_layers: Sequence[int]
                   ) -> list[Variant]:
    """The store's HNSW search (exact=False) in every layer, at each ef."""
    reference = {layer: store.memory(layer, exact=True) for layer in layers}
    default = default_ef(MemoryConfig().top_k)
    return [Variant(f"store HNSW {size_label(size)}, ef={ef}" + (" (store default)" if ef == default else ""),
                    aliased({layer: store.memory(layer, ef=ef) for layer in layers}, mem_layers), reference)
            for ef in efs]


def table(variants: list[Variant], timings: dict[str, Timing], k: int) -> str:
    # Best of the repeats: other work on a shared machine only ever adds time.
    base = min(timings["no memory"].ms_per_token)
    header = ["variant", "ms/token", "x no memory", "first token s", "search ms / layer / token",
              f"recall@{k} of decode searches (stored layers)", "hnswlib fallbacks"]
    rows = []
    for variant in variants:
        timing = timings[variant.name]
        ms = min(timing.ms_per_token)
        recall = recall_in_situ(variant, timing, k)
        rows.append([variant.name, f"{ms:.1f}", f"{ms / base:.2f}", f"{min(timing.first_token_s):.2f}",
                     f"{statistics.median(timing.search_ms):.2f}" if timing.search_ms else "-",
                     "-" if recall is None else f"{recall:.3f}", timing.fallbacks if variant.memories else "-"])
    return rk.markdown_table(header, rows)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = MemoryConfig()
    loaded, engine = rk.load_engine(config)
    generator = loaded if args.model == "smollm2" else load_model(args.model)
    mem_layers = (generator.memory_config.mem_layers if generator.memory_config is not None
                  else range(loaded.model.config.num_hidden_layers))
    reading = rk.read_book(engine, args.base_tokens)
    prompt = rk.prompts(engine, rk.book_ids(engine), after=reading.num_tokens, length=args.prompt_tokens)[1][1]
    engine.close()
    counter = rk.FallbackCounter()
    variants = [Variant("no memory", None)]
    stores = []
    for size in args.sizes:
        layers = args.layers_1m if size >= 1_000_000 else args.layers
        store = MemoryStore.open(build_tiled(args, loaded, config, reading, size, layers).path, readonly=True)
        stores.append(store)
        if size in args.exact_sizes:
            exact = aliased(exact_memories(args, reading, size, layers), mem_layers)
            variants.append(Variant(f"exact in-RAM {size_label(size)}", exact))
        variants += store_variants(store, size, layers, args.efs, mem_layers)
    timings = measure(generator.model, generator.tokenizer, variants, prompt, args, counter)
    print(f"\nSmolLM2-135M float32, {torch.get_num_threads()} threads; prompt {prompt.shape[1]} tokens, "
          f"{args.new_tokens} new tokens greedy, top_k {config.top_k}, {args.model} with memory in layers "
          f"{','.join(map(str, mem_layers)) if generator.memory_config is not None else 'all'}, "
          f"ms/token = median gap between tokens, best of {args.repeats}; memory: "
          f"{args.base_tokens} real tokens of {rk.BOOK.name} tiled, noise {args.noise:g} x std\n")
    print(table(variants, timings, config.top_k))
    for store in stores:
        store.close()


if __name__ == "__main__":
    main()
