"""One hnswlib index over the keys of one (document, memory layer, KV head).

hnswlib's `ip` space over raw attention keys was measured at recall@128 = 0.48 and sometimes
failed batched searches (DESIGN.md). Maximum-inner-product search is therefore reduced to L2
search: each key k gets one extra coordinate sqrt(B^2 - |k|^2), with B the largest key norm
of that head in that document (known exactly, because indexes are built when the document is
finished), and each query gets 0. Then |q' - k'|^2 = |q|^2 + B^2 - 2 q.k, so the L2 ranking is
the inner-product ranking, and no key can exceed B.

Measured on synthetic anisotropic keys (tests/persistence_helpers/benchmark.py, D=64, M=16,
ef_construction=100): recall@128 at ef=128 / 160 / 256 / 384 is 0.968 / 0.980 / 0.994 / 0.998
at 6k keys and 0.935 / 0.955 / 0.981 / 0.991 at 50k keys; hence the default ef = 2k.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from .kvfile import rows_float32

__all__ = ["IndexParams", "HnswIndex", "build_index", "default_ef", "num_threads"]

logger = logging.getLogger(__name__)

_BUILD_ROWS = 65536  # keys converted and inserted per add_items call (bounds RAM while building)


@dataclass(frozen=True)
class IndexParams:
    """hnswlib construction parameters, recorded per document."""

    # Graph degree. 16 and 24 gave the same recall on synthetic keys; 16 keeps the index
    # (about 400 bytes per key at D=64, loaded into RAM) smaller.
    M: int = 16
    # Candidate list while building: 200 halved build speed for +0.005 recall over 100.
    ef_construction: int = 100
    # Fixed seed: the same keys give the same index, so results are reproducible.
    seed: int = 100

    def __post_init__(self) -> None:
        if self.M < 2 or self.ef_construction < 1:
            raise ValueError(f"IndexParams needs M >= 2 and ef_construction >= 1, got {self}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_ef(k: int) -> int:
    """Search-time candidate list for top-k.

    2k sufficed on synthetic keys, not on real ones: on a SmolLM2 store of 6k tokens answers
    were wrong at ef 64-256 and right at 512 (identical keys of repeated tokens in low layers,
    and a few huge-norm keys that squeeze the rest together under the L2 reduction).
    """
    return max(2 * k, 512)


def num_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _augment(keys: np.ndarray, bound: float) -> np.ndarray:
    """Keys (n, D) float32 -> (n, D+1) with the extra coordinate sqrt(bound^2 - |k|^2)."""
    squared = np.einsum("nd,nd->n", keys, keys)
    extra = np.sqrt(np.maximum(bound * bound - squared, 0.0)).astype(np.float32)
    return np.concatenate([keys, extra[:, None]], axis=1)


def _norm_bound(kv: np.ndarray, head: int, dtype: str) -> float:
    """Largest key norm of one head in a (N, 2, Hkv, D) array, in float32 as the index sees it."""
    largest = 0.0
    for start in range(0, kv.shape[0], _BUILD_ROWS):
        keys = rows_float32(kv[start : start + _BUILD_ROWS, 0, head], dtype).numpy()
        largest = max(largest, float(np.einsum("nd,nd->n", keys, keys).max()))
    return float(np.sqrt(largest))


def build_index(kv: np.ndarray, head: int, dtype: str, params: IndexParams) -> tuple[hnswlib.Index, float]:
    """Index the keys of one KV head of kv (N, 2, Hkv, D); returns (index, norm bound B)."""
    count, _, _, dim = kv.shape
    bound = _norm_bound(kv, head, dtype)
    index = hnswlib.Index(space="l2", dim=dim + 1)
    index.init_index(max_elements=count, ef_construction=params.ef_construction, M=params.M,
                     random_seed=params.seed)
    for start in range(0, count, _BUILD_ROWS):
        keys = rows_float32(kv[start : start + _BUILD_ROWS, 0, head], dtype).numpy()
        labels = np.arange(start, start + keys.shape[0], dtype=np.int64)
        index.add_items(_augment(keys, bound), labels, num_threads=num_threads())
    return index, bound


class HnswIndex:
    """A loaded index, searchable from several threads (set_ef + knn_query run under a lock)."""

    def __init__(self, index: hnswlib.Index, count: int) -> None:
        self._index = index
        self.count = count
        self._lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, head_dim: int, count: int) -> HnswIndex:
        """Load an index saved by `build_index` + `save_index` over `count` keys of size head_dim."""
        index = hnswlib.Index(space="l2", dim=head_dim + 1)
        index.load_index(str(path), max_elements=count)
        loaded = index.get_current_count()
        if loaded != count:
            raise ValueError(f"index {path} holds {loaded} keys, expected {count}")
        return cls(index, count)

    def search(self, queries: np.ndarray, k: int, ef: int) -> np.ndarray | None:
        """Token indices (R, k) int64 of the approximate top-k keys for queries (R, D) float32.

        k must be <= count. Returns None when hnswlib cannot fill k results (the caller then
        searches exactly), so a rare graph defect costs speed, never results.
        """
        assert 0 < k <= self.count
        data = np.concatenate([queries, np.zeros((queries.shape[0], 1), np.float32)], axis=1)
        with self._lock:
            self._index.set_ef(max(ef, k))
            try:
                labels, _ = self._index.knn_query(data, k=k, num_threads=num_threads())
            except RuntimeError as error:
                logger.warning("hnswlib search failed (%s); falling back to exact search", error)
                return None
        return labels.astype(np.int64, copy=False)
