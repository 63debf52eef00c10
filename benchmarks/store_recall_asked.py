"""Recall of a store's hnswlib search on the queries its own model sends while answering.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_recall_asked.py STORE QUESTIONS.json [--efs 128 512 2048]

Where store_recall.py builds its store from the zero-shot model's keys, this takes any store as
`fot-memory read` left it (for example a whole novel read by `smollm2-fot`, whose trained layers
make other keys) and the model the store records. It asks each question (a JSON list of
[question, expected answer]) once with exact search, keeping every query each memory layer
sends, then searches those queries again one position at a time, as decoding does: recall@k of
hnswlib at each ef against the exact top-k over the same stored keys (ties count as hits).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import _real_keys as rk
from fot_memory_plugin.documents.document_memory import DocumentMemory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("questions", type=Path)
    parser.add_argument("--efs", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--max-new-tokens", type=int, default=6)
    args = parser.parse_args()
    questions = json.loads(args.questions.read_text(encoding="utf-8"))

    with DocumentMemory.open(args.store, readonly=True) as memory:
        store, k = memory.store, memory.engine.config.top_k
        captured: dict[int, list[torch.Tensor]] = {}  # per layer: (1, Hq, T, D) queries, per search
        exact_memory = store.memory

        def instrumented(layer: int, *options, **keywords):
            found = exact_memory(layer, *options, **keywords)
            search = found.search

            def keeping(queries: torch.Tensor, top_k: int):
                captured.setdefault(layer, []).append(queries.detach().float().clone())
                return search(queries, top_k)

            found.search = keeping  # the sources still need the store's own memory object
            return found

        store.memory = instrumented  # the store's memories, wrapped, for the one exact pass
        for question, _ in questions:
            memory.ask(question, chat=False, max_new_tokens=args.max_new_tokens, exact=True)
        store.memory = exact_memory

        print(f"{args.store}: {len(questions)} questions, top_k {k}, recall@{k} of hnswlib vs exact\n")
        header = ["layer", "queries (positions x heads)"] + [f"ef {ef}" for ef in args.efs]
        rows, means = [], {ef: [] for ef in args.efs}
        for layer in sorted(captured):
            queries = [q[:, :, t:t + 1] for q in captured[layer] for t in range(q.shape[2])]
            reference = exact_memory(layer, exact=True)
            exact_scores = [rk.hit_scores(q, reference.search(q, k).keys) for q in queries]
            row = [layer, f"{len(queries)} x {queries[0].shape[1]}"]
            for ef in args.efs:
                searched = exact_memory(layer, ef=ef)
                recalls = [rk.recall_at_k(rk.hit_scores(q, searched.search(q, k).keys), exact).mean().item()
                           for q, exact in zip(queries, exact_scores)]
                means[ef].append(statistics.fmean(recalls))
                row.append(f"{means[ef][-1]:.3f}")
            rows.append(row)
            print(f"layer {layer} done", flush=True)
        rows.append(["mean", ""] + [f"{statistics.fmean(means[ef]):.3f}" for ef in args.efs])
        print(rk.markdown_table(header, rows))


if __name__ == "__main__":
    with torch.no_grad():
        main()
