"""What storing keys at lower precision does to the exact top-k, on a model's real queries.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/key_precision.py STORE [--layers 17 20 23]

STORE: a float16 store of one document (for example the whole novel, `fot-memory read`). Its
model asks the eight cues (benchmarks/results/novel/pp_questions.json) with exact search, keeping
every query each memory layer sends (store_recall_asked.capture); then, per layer and KV head,
the stored keys are rounded to each scheme and the exact top-32 under the rounded keys is
compared with the float16 keys' own: recall@32 (ties count as hits, every hit scored with its
float16 key) and captured softmax mass. Schemes: bfloat16 (a store dtype), int8 with one absmax
scale per vector (the int8 store dtype), and one scale per group of 32 or 16 dimensions.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import _real_keys as rk
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence.kvfile import quantize_int8, rows_float32, stored_float
from store_recall_asked import capture

QUESTIONS = Path(__file__).resolve().parent / "results" / "novel" / "pp_questions.json"


def int8_groups(keys: torch.Tensor, group: int) -> torch.Tensor:
    """Keys (N, D) through int8 with one scale per `group` dimensions (group = D: the store's int8)."""
    n, dim = keys.shape
    grouped = keys.reshape(n * dim // group, group)
    return stored_float(quantize_int8(grouped), "int8").reshape(n, dim)


SCHEMES = {
    "bfloat16": lambda keys: keys.to(torch.bfloat16).float(),
    "int8, a scale per vector (the int8 store)": lambda keys: int8_groups(keys, keys.shape[1]),
    "int8, a scale per 32 dimensions": lambda keys: int8_groups(keys, 32),
    "int8, a scale per 16 dimensions": lambda keys: int8_groups(keys, 16),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path)
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--layers", type=int, nargs="*", help="memory layers to measure (default: all)")
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    questions = json.loads(args.questions.read_text(encoding="utf-8"))
    results: dict[str, dict[int, tuple[float, float]]] = {name: {} for name in SCHEMES}
    with torch.no_grad(), DocumentMemory.open(args.store, readonly=True) as memory:
        captured = capture(memory, questions, 6)
        for layer in args.layers or sorted(captured):
            (part,) = memory.store.memory(layer, exact=True)._parts
            keys = rows_float32(part.kv[:, 0], part.dtype)  # (N, Hkv, D)
            queries = torch.stack([q[0, :, 0] for q in captured[layer]], dim=1)  # (Hq, searches, D)
            group = queries.shape[0] // keys.shape[1]
            scale = 1 / math.sqrt(keys.shape[-1])
            for name, rounded in SCHEMES.items():
                recalls, masses = [], []
                for head in range(keys.shape[1]):
                    true_keys = keys[:, head]
                    rows = queries[head * group : (head + 1) * group].reshape(-1, keys.shape[-1])
                    true = rows @ true_keys.T
                    best = true.topk(args.k, dim=1).values
                    found = true.gather(1, (rows @ rounded(true_keys).T).topk(args.k, dim=1).indices)
                    recalls.append(rk.recall_at_k(found, best).mean().item())
                    normaliser = torch.logsumexp(true * scale, dim=1, keepdim=True)
                    masses.append((torch.exp(found * scale - normaliser).sum(1)
                                   / torch.exp(best * scale - normaliser).sum(1)).mean().item())
                results[name][layer] = (float(np.mean(recalls)), float(np.mean(masses)))
            print(f"layer {layer} done ({queries.shape[1]} searches)", flush=True)
    layers = sorted(next(iter(results.values())))
    header = ["keys stored as"] + [f"layer {layer}" for layer in layers] + [f"mean recall@{args.k}", "mean mass"]
    print(rk.markdown_table(header, [[name] + [f"{per_layer[layer][0]:.3f}" for layer in layers]
                                     + [f"**{np.mean([v[0] for v in per_layer.values()]):.3f}**",
                                        f"{np.mean([v[1] for v in per_layer.values()]):.4f}"]
                                     for name, per_layer in results.items()]))


if __name__ == "__main__":
    main()
