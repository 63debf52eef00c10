"""Synthetic attention-like keys, values and queries, and a numpy brute-force reference.

Keys are anisotropic like real attention keys (a few large-norm directions, a large shared
offset, noise); queries come from a different distribution than keys (DESIGN.md warns that
index quality measured with queries drawn like keys is optimistic).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from fot_memory_plugin.persistence import IndexParams

KV_HEADS, Q_HEADS, HEAD_DIM = 3, 9, 64
LAYERS = (0, 1)


def fingerprint(**changes: Any) -> dict[str, Any]:
    """A model fingerprint shaped like the core's."""
    base = {
        "model_id": "synthetic/tiny",
        "config_hash": "0123abcd",
        "memory_config": {"local_window": 256, "positional_mode": "zero", "mem_dtype": "float16"},
        "num_kv_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "mem_layers": list(LAYERS),
    }
    base.update(changes)
    return base


def _basis(layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """The "model": a fixed orthonormal basis and key offset per (layer, KV head)."""
    rng = np.random.default_rng(1000 + 10 * layer + head)
    basis = np.linalg.qr(rng.standard_normal((HEAD_DIM, HEAD_DIM)))[0]
    offset = rng.standard_normal(HEAD_DIM) * 0.5 + basis[:, 0] * 6.0
    return basis, offset


def doc_arrays(seed: int, num_tokens: int, layer: int, kv_heads: int = KV_HEADS) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values (Hkv, N, D) float32 of one synthetic document and layer."""
    rng = np.random.default_rng([seed, layer])
    scales = np.concatenate([[12.0, 8.0, 6.0, 4.0], np.ones(HEAD_DIM - 4)])
    keys = np.empty((kv_heads, num_tokens, HEAD_DIM), np.float32)
    for head in range(kv_heads):
        basis, offset = _basis(layer, head)
        keys[head] = (rng.standard_normal((num_tokens, HEAD_DIM)) * scales) @ basis.T + offset
    values = rng.standard_normal((kv_heads, num_tokens, HEAD_DIM)).astype(np.float32)
    return keys, values


def queries(seed: int, length: int, layer: int = 0) -> torch.Tensor:
    """Queries (1, Hq, T, D) float32; query head h belongs to KV head h // (Hq // Hkv)."""
    rng = np.random.default_rng([seed, 99, layer])
    group = Q_HEADS // KV_HEADS
    scales = np.concatenate([[2.0, 5.0, 3.0, 6.0], np.full(HEAD_DIM - 4, 1.5)])
    out = np.empty((1, Q_HEADS, length, HEAD_DIM), np.float32)
    for q_head in range(Q_HEADS):
        basis, offset = _basis(layer, q_head // group)
        out[0, q_head] = (rng.standard_normal((length, HEAD_DIM)) * scales) @ basis.T - 0.5 * offset + 2 * basis[:, 1]
    return torch.from_numpy(out)


def write_document(store, name: str, seed: int, num_tokens: int, *, window: int = 512, layers=LAYERS,
                   sleep_s: float = 0.0, **options: Any):
    """Read a synthetic document into the store window by window; returns its DocumentRecord.

    Indexed with hnswlib unless index_params say otherwise: these random keys have no clusters,
    so the store's default cluster index would need most of them probed (tests/test_cluster_index.py).
    """
    arrays = {layer: doc_arrays(seed, num_tokens, layer) for layer in layers}
    options.setdefault("metadata", {"synthetic": f"{seed}:{num_tokens}"})
    options.setdefault("index_params", IndexParams(kind="hnsw"))
    with store.begin_document(name, sha256=f"sha-{name}-{seed}", text_length=num_tokens * 4, **options) as writer:
        for start in range(0, num_tokens, window):
            for layer in layers:
                keys, values = arrays[layer]
                writer.append(layer, keys[:, start : start + window], values[:, start : start + window])
            if sleep_s:
                time.sleep(sleep_s)
        writer.add_chunks(
            (start, min(start + 100, num_tokens), 4 * start, 4 * min(start + 100, num_tokens), f"chunk at {start}")
            for start in range(0, num_tokens, 100)
        )
    return writer.record


def stored(array: np.ndarray, dtype: str = "float16") -> np.ndarray:
    """What the store keeps of a float32 array, back in float32."""
    if dtype == "float16":
        return array.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return torch.from_numpy(array).to(torch.bfloat16).float().numpy()
    return array


def brute_force(docs: list[tuple[np.ndarray, np.ndarray]], query: torch.Tensor, k: int):
    """Exact global top-k over documents [(keys, values) (Hkv, N, D)] concatenated in order.

    Returns ids (Hq, T, k'), keys and values (Hq, T, k', D), k' = min(k, total), best first.
    """
    keys = np.concatenate([d[0] for d in docs], axis=1)
    values = np.concatenate([d[1] for d in docs], axis=1)
    q = query[0].numpy()  # (Hq, T, D)
    group = q.shape[0] // keys.shape[0]
    scores = np.einsum("htd,hnd->htn", q, np.repeat(keys, group, axis=0))  # (Hq, T, N)
    found = min(k, keys.shape[1])
    ids = np.argsort(-scores, axis=-1, kind="stable")[..., :found]
    head = np.arange(q.shape[0])[:, None, None] // group
    return ids, keys[head, ids], values[head, ids]


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids found, over all (head, position) rows."""
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found.reshape(-1, found.shape[-1]),
                                                                      exact.reshape(-1, exact.shape[-1]))]
    return float(np.mean(hits)) / exact.shape[-1]
