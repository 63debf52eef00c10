"""Retrieval fidelity of the persistent store's HNSW indexes on REAL SmolLM2 keys and queries.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_recall.py     # ~4 min with caches, +4 min the first time
    # = --tokens 16384 --layers 0 5 10 15 20 25 29 --efs 32 64 128 256 512 1024 2048 --ks 32 128
    #   --index-m 16 32 --positions 64 --new-tokens 16 --positional-mode zero
    # ~100k real tokens (reads 98,816 tokens in 7 layers, ~25 min on 2 busy cores):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_recall.py --tokens 98304 --query-tokens 16384 \
        --efs 64 128 256 512 1024 2048 4096 --positions 32

1. Reads the first `tokens` + one window of Persuasion with SmolLM2-135M (no retrieval while
   reading; keys of all 30 layers, or of the evaluated ones when `query-tokens` < `tokens`; cached
   in benchmarks/out/cache) and writes the first `tokens` of the evaluated layers into a store
   (benchmarks/out/stores/recall-<tokens>-M<M>, float16, hnswlib, store defaults but M).
2. Captures the real memory queries: the model, with exact in-RAM memory over the first
   `query-tokens` (default `tokens`) in all 30 layers, answers three 512-token prompts taken from
   the book after the stored text (a continuation, two passages ending in a question about the
   memory) and generates 16 tokens greedily; every query a memory layer sends to memory is
   recorded (prefill positions subsampled, every decode step). Cached too.
3. Per layer, ef and k: recall@k of the store's HNSW search vs the exact top-k over the same
   stored keys, and the captured softmax mass: per query, sum over the retrieved keys of
   softmax(q.k / sqrt(D)) taken over ALL stored keys, divided by the same sum for the exact
   top-k. Searches go one query position at a time (all 9 query heads), as in decoding, timed;
   "fallbacks" counts per-KV-head searches where hnswlib failed ("cannot return the results in a
   contiguous 2D array") and the store scanned exactly instead. Also recall for keys of the
   held-out window used as queries (in-distribution queries, the usual optimistic benchmark).
Recall counts ties as hits (layer 0 keys depend on the token alone, so repeated tokens have
identical keys). Prints markdown tables; writes benchmarks/out/store_recall-<tokens>-<mode>.png/.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import _real_keys as rk  # noqa: E402
from fot_memory_plugin import ExactMemory, MemoryConfig, MemoryEngine  # noqa: E402
from fot_memory_plugin.persistence import IndexParams, MemoryStore, PersistentMemory, default_ef  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens of the book in the store")
    parser.add_argument("--query-tokens", type=int, help="tokens in the model's memory while capturing queries "
                        "(default: --tokens; less saves RAM, since that memory holds all 30 layers)")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5, 10, 15, 20, 25, 29],
                        help="memory layers stored and evaluated (the model itself uses memory in all 30)")
    parser.add_argument("--efs", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--ks", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--index-m", type=int, nargs="+", default=[16, 32], help="hnswlib M; one store per value")
    parser.add_argument("--positions", type=int, default=64, help="prefill query positions kept per prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--positional-mode", choices=["zero", "fixed"], default="zero")
    parser.add_argument("--rebuild", action="store_true", help="rebuild stores even if they exist")
    parser.add_argument("--out", type=Path, default=rk.OUT)
    return parser.parse_args()


@dataclass
class LayerQueries:
    """One layer's queries (Hq, R, D) float32, and which rows came from decode steps (R,) bool."""

    queries: torch.Tensor
    decode: torch.Tensor


def capture_queries(engine: MemoryEngine, reading: rk.Reading, tokens: int, after: int, positions: int,
                    new_tokens: int) -> tuple[dict[int, LayerQueries], list[str]]:
    """Real memory queries of every memory layer while the model answers the prompts; and its answers."""
    memories = {}
    for layer in engine.layers:
        exact = ExactMemory()
        exact.append(reading.keys[layer][None, :, :tokens].float(), reading.values[layer][None, :, :tokens].float())
        memories[layer] = rk.InstrumentedMemory(exact, keep_queries=True)
    engine.reset(memories)
    ids = rk.book_ids(engine)
    per_prompt: list[dict[int, LayerQueries]] = []
    answers = []
    for name, prompt in rk.prompts(engine, ids, after=after, length=engine.config.local_window):
        calls_before = {layer: len(memory.queries) for layer, memory in memories.items()}
        new = engine.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        answers.append(f"{name}: {engine.tokenizer.decode(new[0], skip_special_tokens=True)!r}")
        per_prompt.append({layer: _split_calls(memory.queries[calls_before[layer]:], positions)
                           for layer, memory in memories.items()})
    engine.reset()
    merged = {layer: LayerQueries(torch.cat([p[layer].queries for p in per_prompt], dim=1),
                                  torch.cat([p[layer].decode for p in per_prompt]))
              for layer in engine.layers}
    return merged, answers


def cached_queries(engine: MemoryEngine, reading: rk.Reading, args: argparse.Namespace, after: int
                   ) -> tuple[dict[int, LayerQueries], list[str]]:
    """capture_queries, cached: generating with exact memory in 30 layers takes minutes here."""
    cache = rk.OUT / "cache" / (f"queries-{reading.num_tokens}-{args.query_tokens}-after{after}-p{args.positions}-"
                                f"n{args.new_tokens}-{args.positional_mode}.pt")
    if cache.exists():
        saved = torch.load(cache)
        return {layer: LayerQueries(*pair) for layer, pair in saved["queries"].items()}, saved["answers"]
    queries, answers = capture_queries(engine, reading, args.query_tokens, after, args.positions, args.new_tokens)
    torch.save({"queries": {layer: (q.queries, q.decode) for layer, q in queries.items()}, "answers": answers}, cache)
    return queries, answers


def _split_calls(calls: list[torch.Tensor], positions: int) -> LayerQueries:
    """Prefill calls (T > 1, in chunks) subsampled to `positions` evenly spaced rows, plus every decode call."""
    prefill = torch.cat([call[0] for call in calls if call.shape[2] > 1], dim=1)  # (Hq, P, D)
    keep = torch.linspace(0, prefill.shape[1] - 1, min(positions, prefill.shape[1])).round().long()
    decode = [call[0] for call in calls if call.shape[2] == 1]
    queries = torch.cat([prefill[:, keep], *decode], dim=1)
    is_decode = torch.cat([torch.zeros(len(keep), dtype=torch.bool), torch.ones(len(decode), dtype=torch.bool)])
    return LayerQueries(queries, is_decode)


def held_out_keys(reading: rk.Reading, layer: int, tokens: int, q_heads: int, count: int = 64) -> torch.Tensor:
    """Keys of tokens after the memory used as queries (Hq, R, D): each query head gets its KV head's keys."""
    keys = reading.keys[layer][:, tokens:].float()  # (Hkv, W, D)
    keep = torch.linspace(0, keys.shape[1] - 1, min(count, keys.shape[1])).round().long()
    return keys[:, keep].repeat_interleave(q_heads // keys.shape[0], dim=0)


@dataclass
class Exact:
    """Exact reference for one layer's queries (Hq, R, D) over all N stored keys."""

    keys: torch.Tensor  # (Hkv, N, D) float32, as stored (float16 -> float32)
    log_normalizer: torch.Tensor  # (Hq, R): logsumexp over all N keys of q.k / sqrt(D)
    top: dict[int, tuple[torch.Tensor, torch.Tensor]]  # per k: exact top-k scores and ids (Hq, R, k), best first

    def scores(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """q.k (Hq, R, k) of each query with the keys at ids (Hq, R, k)."""
        kv_head = torch.arange(queries.shape[0]) // (queries.shape[0] // self.keys.shape[0])
        return torch.einsum("hrd,hrkd->hrk", queries, self.keys[kv_head[:, None, None], ids])

    def mass(self, scores: torch.Tensor) -> torch.Tensor:
        """Share (Hq, R) of the softmax over all memory held by keys with these scores (Hq, R, k)."""
        scaled = scores / math.sqrt(self.keys.shape[-1])
        return torch.exp(scaled - self.log_normalizer[..., None]).sum(-1)


def exact_reference(queries: torch.Tensor, keys: torch.Tensor, ks: list[int]) -> Exact:
    """queries (Hq, R, D), keys (Hkv, N, D) float32."""
    group = queries.shape[0] // keys.shape[0]
    normalizers, tops = [], {k: ([], []) for k in ks}
    for head in range(keys.shape[0]):  # one KV head at a time bounds the (group, R, N) score matrix
        scores = queries[head * group : (head + 1) * group] @ keys[head].T
        normalizers.append(torch.logsumexp(scores / math.sqrt(keys.shape[-1]), dim=-1))
        for k in ks:
            values, ids = scores.topk(k, dim=-1)
            tops[k][0].append(values)
            tops[k][1].append(ids)
    return Exact(keys, torch.cat(normalizers), {k: (torch.cat(v), torch.cat(i)) for k, (v, i) in tops.items()})


@dataclass
class Row:
    M: int
    layer: int
    ef: int
    k: int
    queries: str  # "model" (captured) or "held-out keys"
    recall: float
    recall_decode: float  # over decode-step queries only (nan for held-out keys)
    mass_ratio: float  # captured softmax mass / exact top-k's
    exact_mass: float  # share of the whole memory softmax in the exact top-k
    ms_per_search: float  # one position, all query heads: what one decode step costs per layer
    fallbacks: float  # share of per-KV-head searches where hnswlib failed and the store scanned exactly


def score(queries: torch.Tensor, found: torch.Tensor, exact: Exact, k: int) -> tuple[torch.Tensor, ...]:
    """Per query row: recall (ties count), captured mass / exact top-k mass, exact top-k mass; found (Hq, R, k) ids."""
    top_scores, _ = exact.top[k]
    found_scores = exact.scores(queries, found)
    exact_mass = exact.mass(top_scores)
    return rk.recall_at_k(found_scores, top_scores), exact.mass(found_scores) / exact_mass, exact_mass


def search_each_position(memory: PersistentMemory, batch: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Token ids (Hq, R, k) searching one position at a time, as decoding does; and seconds per search.

    One position per call also keeps a failed hnswlib search (which makes the store scan the
    whole call's batch exactly) from hiding the other positions' approximate results.
    """
    found = []
    started = time.perf_counter()
    for row in range(batch.shape[1]):
        found.append(memory.search(batch[None, :, row : row + 1], k).token_ids[0])
    return torch.cat(found, dim=1), (time.perf_counter() - started) / batch.shape[1]


def evaluate_layer(store: MemoryStore, M: int, layer: int, queries: LayerQueries, held_out: torch.Tensor,
                   keys: torch.Tensor, efs: list[int], ks: list[int], counter: rk.FallbackCounter) -> list[Row]:
    rows = []
    for kind, batch, decode in (("model", queries.queries, queries.decode), ("held-out keys", held_out, None)):
        exact = exact_reference(batch, keys, ks)
        for k in ks:
            # The store searches with max(ef, k); its default ef always, for the per-layer table.
            for ef in sorted({max(ef, k) for ef in efs} | {default_ef(k)}):
                failed_before = counter.count
                found, seconds = search_each_position(store.memory(layer, ef=ef, exact_below=0), batch, k)
                recall, ratio, exact_mass = score(batch, found, exact, k)
                recall_decode = recall[:, decode].mean().item() if decode is not None else float("nan")
                searches = batch.shape[1] * keys.shape[0]  # one hnswlib call per position and KV head
                rows.append(Row(M, layer, ef, k, kind, recall.mean().item(), recall_decode, ratio.mean().item(),
                                exact_mass.mean().item(), 1e3 * seconds, (counter.count - failed_before) / searches))
    return rows


def exact_scan_ms(store: MemoryStore, layer: int, queries: torch.Tensor, k: int) -> float:
    """The store's exact scan (its reference path), ms per one-position search (16 positions timed)."""
    return 1e3 * search_each_position(store.memory(layer, exact=True), queries[:, :16], k)[1]


def summary_table(rows: list[Row], ks: list[int], efs: list[int], exact_ms: dict[int, float]) -> str:
    """Per (M, ef): mean over layers and the worst layer, model queries."""
    header = ["M", "ef"]
    for k in ks:
        header += [f"recall@{k} mean", f"recall@{k} min (layer)", f"mass@{k} mean", f"mass@{k} min",
                   f"ms/search k={k}", f"fallbacks k={k}"]
    body = []
    for M in sorted({row.M for row in rows}):
        for ef in sorted(set(efs)):
            line: list[object] = [M, ef]
            for k in ks:
                cells = [r for r in rows if r.M == M and r.k == k and r.ef == max(ef, k) and r.queries == "model"]
                if ef < k:  # the same search as ef = k
                    line += [f"(= ef {k})"] + [""] * 5
                    continue
                worst = min(cells, key=lambda r: r.recall)
                line += [f"{_mean(c.recall for c in cells):.3f}", f"{worst.recall:.3f} ({worst.layer})",
                         f"{_mean(c.mass_ratio for c in cells):.4f}", f"{min(c.mass_ratio for c in cells):.4f}",
                         f"{_mean(c.ms_per_search for c in cells):.2f}", f"{_mean(c.fallbacks for c in cells):.1%}"]
            body.append(line)
    line = ["exact scan", "-"]
    for k in ks:
        line += ["1", "1", "1", "1", f"{exact_ms[k]:.2f}", "-"]
    body.append(line)
    return rk.markdown_table(header, body)


def layer_table(rows: list[Row], M: int, k: int, target: float = 0.95) -> str:
    """Per layer at the store's default ef for k: model queries vs held-out keys as queries,
    and the smallest ef measured that reaches `target` recall with the model's queries."""
    ef = max(default_ef(k), k)
    header = ["layer", f"recall@{k}", f"recall@{k} decode steps", f"mass@{k}", f"exact top-{k} share of memory softmax",
              "fallbacks", f"recall@{k} held-out keys as queries", f"ef for recall >= {target}"]
    body = []
    for layer in sorted({row.layer for row in rows}):
        mine = [r for r in rows if (r.M, r.layer, r.k) == (M, layer, k)]
        model, keys = (next(r for r in mine if (r.ef, r.queries) == (ef, kind)) for kind in ("model", "held-out keys"))
        enough = [r.ef for r in mine if r.queries == "model" and r.recall >= target]
        body.append([layer, f"{model.recall:.3f}", f"{model.recall_decode:.3f}", f"{model.mass_ratio:.4f}",
                     f"{model.exact_mass:.3f}", f"{model.fallbacks:.1%}", f"{keys.recall:.3f}",
                     min(enough) if enough else f"> {max(r.ef for r in mine)}"])
    return f"M={M}, k={k}, ef={ef} (the store's default for k={k}):\n\n" + rk.markdown_table(header, body)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def plot(rows: list[Row], ks: list[int], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for M in sorted({row.M for row in rows}):
        for k in ks:
            model = [r for r in rows if r.M == M and r.k == k and r.queries == "model"]
            efs = sorted({r.ef for r in model})
            for axis, field in ((left, "recall"), (right, "mass_ratio")):
                means = [_mean(getattr(r, field) for r in model if r.ef == ef) for ef in efs]
                worst = [min(getattr(r, field) for r in model if r.ef == ef) for ef in efs]
                line, = axis.plot(efs, means, marker="o", label=f"M={M} k={k} mean over layers")
                axis.plot(efs, worst, linestyle="--", color=line.get_color(), label=f"M={M} k={k} worst layer")
            if k == ks[0]:  # the optimistic benchmark, for contrast
                keys = [r for r in rows if r.M == M and r.k == k and r.queries == "held-out keys"]
                left.plot(efs, [_mean(r.recall for r in keys if r.ef == ef) for ef in efs], linestyle=":",
                          color=line.get_color(), label=f"M={M} k={k} held-out keys as queries")
    left.axhline(0.95, color="grey", linewidth=0.8)
    left.set(xscale="log", xlabel="ef", ylabel="recall@k vs exact top-k", title="HNSW recall, real SmolLM2 queries")
    right.set(xscale="log", xlabel="ef", ylabel="softmax mass captured / exact top-k's",
              title="Captured attention mass")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def readings(args: argparse.Namespace, config: MemoryConfig
             ) -> tuple[rk.LoadedModel, dict[int, LayerQueries], rk.Reading]:
    """The model's memory queries, and the reading whose keys go into the store (one window more, held out)."""
    loaded, engine = rk.load_engine(config)  # memory in all 30 layers while capturing queries
    window = config.local_window
    memory = rk.read_book(engine, args.query_tokens + window)
    after = max(args.tokens, args.query_tokens) + window  # prompts come from text the store does not hold
    queries, answers = cached_queries(engine, memory, args, after)
    print("answers with exact memory:", *answers, sep="\n  ")
    engine.close()
    if args.tokens == args.query_tokens:
        return loaded, queries, memory
    # Only the evaluated layers: 30 layers of 100k tokens would not fit in RAM here.
    reader = MemoryEngine(loaded.model, loaded.tokenizer, config.replace(mem_layers=tuple(args.layers)))
    keys = rk.read_book(reader, args.tokens + window)
    reader.close()
    return loaded, queries, keys


def main() -> None:
    args = parse_args()
    args.query_tokens = args.query_tokens or args.tokens
    config = MemoryConfig(positional_mode=args.positional_mode)
    window = config.local_window
    loaded, queries, reading = readings(args, config)
    rows: list[Row] = []
    exact_ms: dict[int, float] = {}
    counter = rk.FallbackCounter()
    fingerprint = rk.fingerprint(loaded, config, args.layers)
    q_heads = queries[args.layers[0]].queries.shape[0]
    for M in args.index_m:
        built = rk.build_store(rk.STORES / f"recall-{args.tokens}-M{M}", fingerprint,
                               reading.windows(args.layers, 0, args.tokens, window), num_tokens=args.tokens,
                               index_params=IndexParams(M=M), rebuild=args.rebuild)
        if built.commit_seconds is not None:
            print(f"built {built.path.name}: {len(args.layers)} layers, appends (indexes grow meanwhile) "
                  f"{built.append_seconds:.0f} s + commit {built.commit_seconds:.0f} s")
        with MemoryStore.open(built.path, readonly=True) as store:
            for layer in args.layers:
                keys = reading.keys[layer][:, : args.tokens].float()
                held_out = held_out_keys(reading, layer, args.tokens, q_heads)
                rows += evaluate_layer(store, M, layer, queries[layer], held_out, keys, args.efs, args.ks, counter)
            for k in args.ks if M == args.index_m[0] else ():  # the exact scan does not depend on M
                exact_ms[k] = _mean(exact_scan_ms(store, layer, queries[layer].queries, k) for layer in args.layers)
    count = queries[args.layers[0]].queries.shape[1]
    print(f"\n{args.tokens} real tokens in the store; {count} query positions x {q_heads} heads per layer "
          f"({int(queries[args.layers[0]].decode.sum())} decode steps), captured with {args.query_tokens} tokens in "
          f"memory; layers {args.layers}; mode {args.positional_mode}\n")
    print(summary_table(rows, args.ks, args.efs, exact_ms))
    for M in args.index_m:
        for k in args.ks:
            print("\n" + layer_table(rows, M, k))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"store_recall-{args.tokens}-{args.positional_mode}"
    plot(rows, args.ks, args.out / f"{name}.png")
    (args.out / f"{name}.json").write_text(json.dumps([asdict(row) for row in rows], indent=1))


if __name__ == "__main__":
    main()
