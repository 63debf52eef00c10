"""Recall and captured attention mass of a store's searches on the queries its own model sends
while answering: hnswlib graphs at several ef, cluster indexes at several probe shares.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_recall_asked.py STORE QUESTIONS.json \
        [--efs 128 256 512] [--probes 0.025 0.05 0.1] [--cluster-size 64]

Takes any store as `fot-memory read` left it (for example a whole novel read by `smollm2-fot`)
and the model the store records. It asks each question (a JSON list of [question, expected
answer]) once with exact search, keeping every query each memory layer sends, then searches
those queries again one position at a time, as decoding does, and compares with the exact
top-k over the same stored keys: recall@k (ties count as hits) and captured mass (the softmax
mass over ALL stored keys that the hits carry, relative to the exact top-k's), and the time per
search. --whole-passes searches each forward pass's queries together instead, as a prompt's
prefill sends them (where the cluster index's shared candidate set binds: --shared).
hnswlib rows need a store indexed with hnswlib; cluster rows use cluster indexes built
here from the store's `.kv` files by the function a commit uses (timed: "build s").
--reference REF_STORE: the same text read into another store by the same model (for example
float16 against an int8 STORE, `fot-memory read --mem-dtype int8`): the queries are captured
from REF_STORE, the reference is REF_STORE's exact search, every hit of STORE is scored with
REF_STORE's key of the same token, and an "exact" row shows STORE's own exact scan: what
STORE's keys lose against the reference's, on top of what its search loses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import _real_keys as rk
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence import IndexParams, PersistentMemory
from fot_memory_plugin.persistence.cluster_index import ClusterSearch, build_cluster_index
from fot_memory_plugin.persistence.kvfile import rows_float32
from fot_memory_plugin.persistence.memory import DocumentLayer
from fot_memory_plugin.persistence.store import index_kind


def capture(memory: DocumentMemory, questions: list, max_new_tokens: int,
            whole_passes: bool = False) -> dict[int, list[torch.Tensor]]:
    """Every query (1, Hq, 1, D) each memory layer sends while the questions are asked (exact
    search); whole_passes: each search's queries (1, Hq, T, D) as they were sent."""
    store = memory.store
    captured: dict[int, list[torch.Tensor]] = {}
    original = store.memory

    def instrumented(layer: int, *options, **keywords):
        found = original(layer, *options, **keywords)
        search = found.search

        def keeping(queries: torch.Tensor, top_k: int):
            captured.setdefault(layer, []).append(queries.detach().float().clone())
            return search(queries, top_k)

        found.search = keeping  # the sources still need the store's own memory object
        return found

    store.memory = instrumented
    try:
        for question, _ in questions:
            memory.ask(question, chat=False, max_new_tokens=max_new_tokens, exact=True)
    finally:
        store.memory = original
    if whole_passes:
        return captured
    return {layer: [q[:, :, t : t + 1] for q in found for t in range(q.shape[2])] for layer, found in captured.items()}


def clustered_parts(exact: PersistentMemory, params: IndexParams, window: int,
                    two_level: bool) -> tuple[list[DocumentLayer], float]:
    """The same documents with cluster indexes built here from their `.kv` files; build seconds."""
    parts, started = [], time.perf_counter()
    for part in exact._parts:
        size = max(params.cluster_size, -(-part.num_tokens // params.max_clusters))
        index = build_cluster_index(part.kv, part.dtype, np.arange(0, part.num_tokens, window), cluster_size=size,
                                    iterations=params.kmeans_iterations, sample=params.kmeans_sample, seed=params.seed,
                                    two_level=two_level)
        parts.append(DocumentLayer(part.doc_id, part.name, part.kv, part.dtype,
                                   [index.head(h) for h in range(part.kv.shape[2])]))
    return parts, time.perf_counter() - started


def log_normaliser(exact: PersistentMemory, queries: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(q.k_j / sqrt(D)) over every stored key, per (query head, position): (Hq, T)."""
    q = queries[0]  # (Hq, T, D)
    group = q.shape[0] // exact.kv_heads
    totals = []
    for part in exact._parts:
        keys = rows_float32(part.kv[:, 0], part.dtype)  # (N, Hkv, D)
        keys = keys.permute(1, 0, 2).repeat_interleave(group, dim=0)  # (Hq, N, D)
        totals.append(torch.logsumexp(torch.einsum("htd,hnd->htn", q, keys) / math.sqrt(q.shape[-1]), dim=-1))
    return torch.logsumexp(torch.stack(totals), dim=0)


def mass(queries: torch.Tensor, hit_keys: torch.Tensor, mask: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """Softmax mass (Hq, T) over all memory carried by the hits."""
    scores = rk.hit_scores(queries, hit_keys)[0] / math.sqrt(queries.shape[-1])  # (Hq, T, k)
    return torch.exp(scores - normaliser[..., None]).masked_fill(~mask[0], 0).sum(-1)


def reference_keys(reference: PersistentMemory, hits) -> torch.Tensor:
    """The reference store's keys (1, Hq, T, k, D) float32 of the tokens the hits found (one
    document of the same length in both stores: a token's id is the same in each)."""
    (part,) = reference._parts
    ids = hits.token_ids.clamp(min=0)[0]  # (Hq, T, k); masked hits are scored by token 0, then masked
    group = ids.shape[0] // reference.kv_heads
    keys = [rows_float32(part.kv[ids[h].reshape(-1).numpy(), 0, h // group], part.dtype).reshape(*ids.shape[1:], -1)
            for h in range(ids.shape[0])]
    return torch.stack(keys)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("questions", type=Path)
    parser.add_argument("--efs", type=int, nargs="*", default=[128, 256, 512])
    parser.add_argument("--probes", type=float, nargs="*", default=[0.025, 0.05, 0.1])
    parser.add_argument("--shared", type=float, nargs="+", default=[ClusterSearch().shared],
                        help="ClusterSearch.shared values tried with each probe")
    parser.add_argument("--whole-passes", action="store_true", help="search each pass's queries together")
    parser.add_argument("--cluster-size", type=int, default=IndexParams().cluster_size)
    parser.add_argument("--kmeans-sample", type=int, default=IndexParams().kmeans_sample)
    parser.add_argument("--kmeans-iterations", type=int, default=IndexParams().kmeans_iterations)
    parser.add_argument("--kmeans", nargs="+", choices=["two-level", "flat"], default=["two-level"],
                        help="how the cluster indexes' k-means runs (build_cluster_index's two_level)")
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--json", type=Path, help="also write the table's figures here")
    parser.add_argument("--reference", type=Path, help="the same text's store to measure STORE against")
    args = parser.parse_args()
    questions = json.loads(args.questions.read_text(encoding="utf-8"))

    with contextlib.ExitStack() as stack:
        memory = stack.enter_context(DocumentMemory.open(args.store, readonly=True))
        against = (stack.enter_context(DocumentMemory.open(args.reference, readonly=True)).store
                   if args.reference else None)
        store, k = memory.store, memory.engine.config.top_k
        window = memory.engine.config.local_window
        records = store.documents()
        kinds = {index_kind(record) for record in records}
        if against is not None:
            (mine,), (theirs,) = records, against.documents()
            if mine.num_tokens != theirs.num_tokens:
                parser.error(f"the stores hold {mine.num_tokens} and {theirs.num_tokens} tokens: read the same text")
            memory.store = against  # capture the reference's queries: the same for every store searched
        try:
            captured = capture(memory, questions, args.max_new_tokens, args.whole_passes)
        finally:
            memory.store = store
        methods = ["exact"] if against is not None else []
        methods += [f"hnsw ef {ef}" for ef in args.efs if kinds == {"hnsw"}]
        methods += [f"clusters {kmeans} probe {probe} shared {shared}" for kmeans in args.kmeans
                    for probe in args.probes for shared in args.shared]
        params = IndexParams(kind="clusters", cluster_size=args.cluster_size, kmeans_sample=args.kmeans_sample,
                             kmeans_iterations=args.kmeans_iterations)
        build_seconds: dict[str, list[float]] = {kmeans: [] for kmeans in args.kmeans}
        print(f"{args.store}: {sum(r.num_tokens for r in records)} tokens, {len(questions)} questions, "
              f"top_k {k}; recall@{k} / captured mass vs exact / ms per search\n", flush=True)
        results: dict[str, dict[int, tuple[float, float, float]]] = {method: {} for method in methods}
        for layer in sorted(captured):
            queries = captured[layer]
            exact = store.memory(layer, exact=True)
            true = exact if against is None else against.memory(layer, exact=True)  # the reference keys
            reference = [true.search(q, k) for q in queries]
            normalisers = [log_normaliser(true, q) for q in queries]
            exact_mass = [mass(q, ref.keys, ref.mask, z) for q, ref, z in zip(queries, reference, normalisers)]
            clustered = {}
            for kmeans in args.kmeans if args.probes else []:
                clustered[kmeans], seconds = clustered_parts(exact, params, window, kmeans == "two-level")
                build_seconds[kmeans].append(seconds)
            for method in methods:
                if method == "exact":
                    searched = exact
                elif method.startswith("hnsw"):
                    searched = store.memory(layer, ef=int(method.split()[-1]), exact_below=0)
                else:
                    words = method.split()
                    search = ClusterSearch(float(words[3]), float(words[5]))
                    searched = PersistentMemory(layer, clustered[words[1]], kv_heads=exact.kv_heads, head_dim=exact.head_dim,
                                                exact_below=0, cluster_search=search)
                recalls, ratios, started = [], [], time.perf_counter()
                hits = [searched.search(q, k) for q in queries]
                seconds = time.perf_counter() - started
                for q, hit, ref, z, full in zip(queries, hits, reference, normalisers, exact_mass):
                    keys = hit.keys if against is None else reference_keys(true, hit)
                    recalls.append(rk.recall_at_k(rk.hit_scores(q, keys), rk.hit_scores(q, ref.keys)).mean().item())
                    ratios.append((mass(q, keys, hit.mask, z) / full).mean().item())
                results[method][layer] = (statistics.fmean(recalls), statistics.fmean(ratios),
                                          1000 * seconds / len(queries))
            print(f"layer {layer} done ({len(queries)} searches x {queries[0].shape[1]} heads)", flush=True)

    layers = sorted(captured)
    header = ["method"] + [f"layer {layer}" for layer in layers] + ["mean recall", "worst layer", "mean mass", "ms / search"]
    rows = []
    for method, per_layer in results.items():
        recall = [per_layer[layer][0] for layer in layers]
        rows.append([method] + [f"{value:.3f}" for value in recall]
                    + [f"**{statistics.fmean(recall):.3f}**", f"{min(recall):.3f}",
                       f"{statistics.fmean(per_layer[layer][1] for layer in layers):.3f}",
                       f"{statistics.fmean(per_layer[layer][2] for layer in layers):.1f}"])
    print(rk.markdown_table(header, rows))
    for kmeans, seconds in build_seconds.items() if args.probes else []:
        print(f"\ncluster index build, {kmeans} k-means: {statistics.fmean(seconds):.1f} s per layer (all KV heads)")
    if args.json:
        args.json.write_text(json.dumps({method: {str(layer): dict(zip(("recall", "mass", "ms"), values))
                                                   for layer, values in per_layer.items()}
                                         for method, per_layer in results.items()}, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
