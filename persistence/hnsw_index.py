"""One hnswlib index over the keys of one (document, memory layer, KV head), and what makes it
find the exact inner-product top-k on real attention keys.

Maximum-inner-product search reduced to L2 search (hnswlib `ip` over raw keys was measured at
recall@128 = 0.48, DESIGN.md): each indexed key k gets one extra coordinate sqrt(B^2 - |k|^2),
each query 0, so |q' - k'|^2 = |q|^2 + B^2 - 2 q.k ranks keys by inner product. On real SmolLM2
keys that alone gave recall@32 of 0.65 at ef 512 on 98k tokens (benchmarks/README.md), for three
reasons, each handled here:

1. Attention keys share a large common component (|mean key| ~ 15, median key norm ~ 16, centred
   norm ~ 7). The index holds CENTRED keys k - mu, mu a per-(document, layer, head) mean key:
   q.(k - mu) = q.k - q.mu, so for each query the ranking is unchanged (exactly), while the
   norms, and with them B and the extra coordinate, shrink. Search results are re-scored with
   the raw stored keys, so scores (and merging across documents) never see mu.
2. A few keys with huge norms set B, which squeezes all other keys onto nearly the same extra
   coordinate. The keys whose centred norm exceeds B, the (1 - exact_fraction) quantile, are
   not indexed but scored exactly on every search (1% of keys: cheap next to the graph walk).
3. In layer 0 a key depends on the token alone: 98k tokens of a novel hold 6.9k distinct keys,
   and thousands of identical points wreck an HNSW graph. Exact duplicates are collapsed: the
   index holds the first token with each key; the others are restored in the results.
4. The first token of every reading window sees no local context, and in some heads its key
   becomes an attention sink that later queries rank highly (26% and 46% of the exact top-32 in
   two heads of smollm2-fot's layers 17 and 18, on a whole novel) while the graph barely reaches
   it: these keys sit in their own corner, not at the top of the norm range. The first key of
   each appended window is therefore scored exactly (one key in 512).

mu, B and whether to collapse duplicates are fixed on the document's first `calibration_tokens`
tokens, so the index is built while the document is still being read (`IndexBuilder`, fed by
the writer's background thread); a later key beyond B simply joins the exact list. When the
whole document is in, keys above the document's own (1 - exact_fraction) norm quantile that
went into the graph are marked deleted there (they still route searches) and scored exactly:
keys that sit at the top of the graph's norm range, such as the key of every window's first
token, are hard to reach through the graph.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch  # before hnswlib: the other order segfaults with torch 2.11 (the GPU machine)

import hnswlib  # noqa: I001

from fot_memory_plugin.core.config import DEFAULT_INDEX, INDEX_KINDS

from .kvfile import rows_float32

__all__ = ["INDEX_KINDS", "IndexParams", "IndexBuilder", "HnswIndex", "IndexExtras", "default_ef", "num_threads"]

logger = logging.getLogger(__name__)

_INITIAL_CAPACITY = 4096  # graph slots allocated first; doubled as keys arrive
_PARALLEL_ROWS = 4096  # add_items calls at least this big use every core (smaller: one thread)
KMEANS_KINDS = ("auto", "two-level", "flat")
_PARALLEL_QUERIES = 32  # knn_query calls with at least this many queries use every core


@dataclass(frozen=True)
class IndexParams:
    """How a document's indexes are built, recorded per document."""

    # "clusters": k-means clusters of each KV head's keys, the best share of them ranked exactly
    # (cluster_index.py; ~13 B per token per layer, built at commit). "hnsw": an hnswlib graph
    # over every key of each KV head (this module; ~1.1 KB per token per layer, built while
    # reading). Measured against each other in benchmarks/README.md ("Cluster index").
    kind: str = DEFAULT_INDEX
    # Cluster index: tokens per cluster (at most max_clusters clusters), k-means iterations and
    # the keys they run on. On a whole novel's asked queries (recall@32 at probe 0.05, build s per
    # layer, before the assignment change that made building ~2x faster): 65,536 keys x 8
    # iterations 0.972, 19.7 s; 32,768 x 6 0.967, 10.0 s; 16,384 x 4 0.957, 6.6 s.
    cluster_size: int = 64
    max_clusters: int = 4096
    kmeans_iterations: int = 6
    kmeans_sample: int = 32768
    # "two-level" (above 512 clusters: coarse groups, then clusters within them), "flat", or
    # "auto": two-level on a CPU, flat on a GPU. On the novel's asked queries two-level finds
    # recall@32 0.966 against 0.972, built in 1.2 s per layer against 7.5 s on this CPU; on an
    # H100 its many small steps made the commit slower (1.6 s against 0.6 s at 64k tokens)
    # (benchmarks/README.md, "Two-level k-means").
    kmeans: str = "auto"

    # Graph degree. M=32 gained +0.02-0.04 recall over 16 on real keys at 1.5-2x the search time
    # and index size; 16 with the fixes in this module's docstring is above 0.95 already.
    M: int = 16
    # Candidate list while building: 200 halved build speed for +0.005 recall over 100.
    ef_construction: int = 100
    # Fixed seed: the same keys in the same order give the same index.
    seed: int = 100
    # Share of keys (largest centred norms) scored exactly instead of indexed. 1% beat 0.3% by
    # 0.02-0.2 recall per head on real keys; 3% added < 0.01.
    exact_fraction: float = 0.01
    # Tokens that fix the centre, the norm bound and duplicate collapsing before keys stream in.
    # 2048 (four windows) set the bound above a cluster of window-start keys in one head of 98k
    # tokens of a novel (recall 0.55 there); 8192 and the correction in `finish` both fix that.
    calibration_tokens: int = 8192
    # Collapse identical keys when at least this share of the calibration keys are repeats
    # (layer 0: ~60%; other layers: < 1%, where a lookup per key would cost for nothing).
    duplicate_share: float = 0.1
    # Score the first key of every appended window exactly (item 4 above). On smollm2-fot's keys
    # of a whole novel, recall@32 of its asked queries in the worst head: 0.71 -> 0.97 at ef 128.
    exact_window_starts: bool = True

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"IndexParams.kind must be one of {INDEX_KINDS}, got {self.kind!r}.")
        for name in ("cluster_size", "max_clusters", "kmeans_iterations", "kmeans_sample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IndexParams.{name} must be a positive int, got {value!r}.")
        if self.kmeans not in KMEANS_KINDS:
            raise ValueError(f"IndexParams.kmeans must be one of {KMEANS_KINDS}, got {self.kmeans!r}.")
        if self.M < 2 or self.ef_construction < 1:
            raise ValueError(f"IndexParams needs M >= 2 and ef_construction >= 1, got {self}.")
        if not 0.0 <= self.exact_fraction < 1.0 or self.calibration_tokens < 1:
            raise ValueError(f"IndexParams needs 0 <= exact_fraction < 1 and calibration_tokens >= 1, got {self}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_ef(k: int) -> int:
    """Search-time candidate list for top-k. Measured with k=32 on real keys and the queries sent
    while answering: the zero-shot model's keys need ef ~128 for recall 0.95, smollm2-fot's keys of
    a whole novel 256 (0.915 at 128, 0.959 at 256); latency at 1M tokens is 1.44x no memory at 256."""
    return max(4 * k, 256)


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


@dataclass
class IndexExtras:
    """What a search needs besides the graph (saved as `layer<L>.h<H>.extra.npz`).

    centre (D,) and bound: how the indexed keys were transformed (kept for inspection);
    exact_ids (S,): tokens scored exactly on every search, of which deleted_ids (S' <= S) are
    also in the graph, marked deleted; dup_ids (P,) and dup_of (P,): token dup_ids[i] has the
    same key as token dup_of[i], which is indexed (or exact) in its place.
    """

    centre: np.ndarray
    bound: float
    exact_ids: np.ndarray
    deleted_ids: np.ndarray
    dup_ids: np.ndarray
    dup_of: np.ndarray

    @classmethod
    def none(cls, dim: int) -> IndexExtras:
        """No centring, no exact list, no duplicates: documents indexed before format 2."""
        empty = np.zeros(0, np.int64)
        return cls(np.zeros(dim, np.float32), float("nan"), empty, empty, empty, empty)

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, centre=self.centre, bound=np.float64(self.bound), exact_ids=self.exact_ids,
                 deleted_ids=self.deleted_ids, dup_ids=self.dup_ids, dup_of=self.dup_of)
        path.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> IndexExtras:
        with np.load(path, allow_pickle=False) as data:
            # deleted_ids came a commit after the first format-2 files (absent there: none deleted).
            ids = {name: data[name].astype(np.int64) if name in data.files else np.zeros(0, np.int64)
                   for name in ("exact_ids", "deleted_ids", "dup_ids", "dup_of")}
            return cls(data["centre"], float(data["bound"]), **ids)


@dataclass
class IndexBuilder:
    """Builds the index of one (layer, KV head) from its keys in token order (`add`), then `finish`.

    Not thread-safe: one thread feeds it (the writer's background thread, or the commit).
    """

    dim: int
    params: IndexParams
    _pending: list[np.ndarray] = field(default_factory=list)  # storage-dtype keys before calibration
    _next_token: int = 0  # token id of the next key added
    _centre: np.ndarray | None = None
    _bound: float = 0.0
    _seen: dict[bytes, int] | None = None  # key bytes -> first token with that key (if collapsing)
    _index: hnswlib.Index | None = None
    _exact: list[np.ndarray] = field(default_factory=list)
    _graph: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (tokens, centred norms)
    _exact_norms: list[np.ndarray] = field(default_factory=list)
    _dups: list[tuple[int, int]] = field(default_factory=list)  # (token, token it duplicates)
    _starts: list[int] = field(default_factory=list)  # window-start tokens, scored exactly

    def add(self, keys: np.ndarray) -> None:
        """Keys (T, D) of the next reading window of T tokens, in the storage element type
        (float16, float32, bfloat16 bits as uint16, or int8 with its scale): identical stored keys
        are what duplicates means."""
        if self._centre is None:
            self._pending.append(np.array(keys))
            if sum(len(block) for block in self._pending) >= self.params.calibration_tokens:
                self._calibrate()
            return
        self._insert(keys)

    def _calibrate(self) -> None:
        """Fix centre, bound and duplicate collapsing on the pending keys, then index them."""
        blocks, self._pending = self._pending, []
        pending = np.concatenate(blocks) if blocks else np.zeros((0, self.dim), np.float16)
        ordinary = np.ones(len(pending), dtype=bool)  # what the graph will hold: not window starts
        if self.params.exact_window_starts and blocks:
            ordinary[np.cumsum([0] + [len(block) for block in blocks[:-1]])] = False
        keys = _float32(pending[ordinary])
        self._centre = keys.mean(axis=0) if len(keys) else np.zeros(self.dim, np.float32)
        distinct = len({row.tobytes() for row in pending})
        if len(pending) and 1 - distinct / len(pending) >= self.params.duplicate_share:
            self._seen = {}
        norms = np.linalg.norm(keys - self._centre, axis=1)
        # The bound covers all but the exact_fraction largest norms (of the distinct keys).
        distinct_norms = np.unique(norms)
        self._bound = float(np.quantile(distinct_norms, 1 - self.params.exact_fraction)) if len(norms) else 0.0
        self._index = hnswlib.Index(space="l2", dim=self.dim + 1)
        self._index.init_index(max_elements=_INITIAL_CAPACITY, ef_construction=self.params.ef_construction,
                               M=self.params.M, random_seed=self.params.seed)
        for block in blocks:
            self._insert(block)

    def _insert(self, keys: np.ndarray) -> None:
        """Index one window's keys (T, D), or list them as exact."""
        assert self._index is not None and self._centre is not None
        tokens = np.arange(self._next_token, self._next_token + len(keys), dtype=np.int64)
        window_start = self._next_token
        self._next_token += len(keys)
        if self._seen is not None:
            keep = np.ones(len(keys), dtype=bool)
            for row, (token, key) in enumerate(zip(tokens.tolist(), keys)):
                first = self._seen.setdefault(key.tobytes(), token)
                if first != token:
                    keep[row] = False
                    self._dups.append((token, first))
            keys, tokens = keys[keep], tokens[keep]
        if self.params.exact_window_starts and len(tokens) and tokens[0] == window_start:
            self._starts.append(window_start)  # a repeated key stays a duplicate of its first token
            keys, tokens = keys[1:], tokens[1:]
        centred = _float32(keys) - self._centre
        norms = np.sqrt(np.einsum("nd,nd->n", centred, centred))
        outside = norms > self._bound
        self._exact.append(tokens[outside])
        self._exact_norms.append(norms[outside])
        centred, tokens = centred[~outside], tokens[~outside]
        if len(tokens) == 0:
            return
        self._graph.append((tokens, norms[~outside]))
        needed = self._index.get_current_count() + len(tokens)
        if needed > self._index.get_max_elements():
            self._index.resize_index(max(needed, 2 * self._index.get_max_elements()))
        threads = num_threads() if len(tokens) >= _PARALLEL_ROWS else 1
        self._index.add_items(_augment(centred, self._bound), tokens, num_threads=threads)

    def finish(self) -> tuple[hnswlib.Index, IndexExtras]:
        """The finished graph and its extras (calibrating on whatever came, if fewer tokens did)."""
        if self._centre is None:
            self._calibrate()
        assert self._index is not None and self._centre is not None
        deleted = self._delete_top_of_graph()
        exact = np.concatenate([*self._exact, np.asarray(self._starts, np.int64), deleted]).astype(np.int64)
        dups = np.asarray(self._dups, dtype=np.int64).reshape(-1, 2)
        extras = IndexExtras(self._centre.astype(np.float32), self._bound, exact, deleted,
                             dups[:, 0].copy(), dups[:, 1].copy())
        return self._index, extras

    def _delete_top_of_graph(self) -> np.ndarray:
        """Mark deleted the graph keys above the whole document's (1 - exact_fraction) norm
        quantile (they go to the exact list); returns their tokens."""
        if not self._graph:
            return np.zeros(0, np.int64)
        tokens = np.concatenate([t for t, _ in self._graph])
        norms = np.concatenate([n for _, n in self._graph])
        everything = np.concatenate([norms, *self._exact_norms])
        bound = float(np.quantile(everything, 1 - self.params.exact_fraction))
        deleted = tokens[norms > bound]
        if len(deleted) >= len(tokens):  # keep the graph searchable
            return np.zeros(0, np.int64)
        for token in deleted.tolist():
            self._index.mark_deleted(token)
        return deleted.astype(np.int64)


def _float32(keys: np.ndarray) -> np.ndarray:
    """Stored keys (n, W) -> float32 (n, D) (bfloat16 is stored as the upper 16 bits of a float32;
    int8 vectors end in their scale)."""
    if keys.dtype == np.uint16:
        return (keys.astype(np.uint32) << 16).view(np.float32)
    if keys.dtype == np.int8:
        return rows_float32(keys, "int8").numpy()
    return keys.astype(np.float32)


class HnswIndex:
    """A loaded index of one (document, layer, KV head), searchable from several threads
    (set_ef + knn_query run under a lock)."""

    def __init__(self, index: hnswlib.Index | None, extras: IndexExtras, num_tokens: int) -> None:
        self._index = index
        self.extras = extras
        self.num_tokens = num_tokens
        # Keys the graph can return (deleted ones still route searches).
        self.count = 0 if index is None else index.get_current_count() - len(extras.deleted_ids)
        self._lock = threading.Lock()
        self._exact_keys: torch.Tensor | None = None  # (S, D) float32 keys of extras.exact_ids
        # Duplicates grouped by the token they duplicate: members[starts[i]:starts[i+1]] repeat groups[i].
        order = np.argsort(extras.dup_of, kind="stable")
        self._groups, first = np.unique(extras.dup_of[order], return_index=True)
        self._starts = np.append(first, len(order)).astype(np.int64)
        self._members = extras.dup_ids[order]

    @classmethod
    def load(cls, path: Path, extras: IndexExtras, head_dim: int, num_tokens: int) -> HnswIndex:
        """Load a saved graph; it must hold every token that is neither exact nor a duplicate."""
        expected = num_tokens - len(extras.exact_ids) + len(extras.deleted_ids) - len(extras.dup_ids)
        index = hnswlib.Index(space="l2", dim=head_dim + 1)
        index.load_index(str(path), max_elements=max(expected, 1))
        loaded = index.get_current_count()
        if loaded != expected:
            raise ValueError(f"index {path} holds {loaded} keys, expected {expected}")
        return cls(index, extras, num_tokens)

    def search(self, queries: torch.Tensor, k: int, ef: int,
               keys_at: Callable[[np.ndarray], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Top-k of the document's tokens by inner product for queries (R, D) float32, k <= num_tokens.

        keys_at(token ids (any shape)) -> stored keys (..., D) float32: candidates are re-scored
        with them. Returns exact scores (R, k) and token ids (R, k) int64, best first; or None
        when hnswlib cannot fill its results (the caller then scans exactly), so a rare graph
        defect costs speed, never results.
        """
        assert 0 < k <= self.num_tokens
        rows = queries.shape[0]
        ids, scores = [], []
        if self.count:
            found = self._graph_search(queries, min(k, self.count), ef)
            if found is None:
                return None
            ids.append(torch.from_numpy(found))
            scores.append(torch.einsum("rd,rkd->rk", queries, keys_at(found)))
        if len(self.extras.exact_ids):
            if self._exact_keys is None:  # a benign race: two threads may both load them
                self._exact_keys = keys_at(self.extras.exact_ids)
            ids.append(torch.from_numpy(self.extras.exact_ids).expand(rows, -1))
            scores.append(queries @ self._exact_keys.T)
        all_scores, all_ids = torch.cat(scores, dim=1), torch.cat(ids, dim=1)  # (R, C)
        top, order = all_scores.topk(min(k, all_ids.shape[1]), dim=1)
        return self._restore_duplicates(top, all_ids.gather(1, order), k)

    def _graph_search(self, queries: torch.Tensor, k: int, ef: int) -> np.ndarray | None:
        data = np.concatenate([queries.numpy(), np.zeros((queries.shape[0], 1), np.float32)], axis=1)
        with self._lock:
            self._index.set_ef(max(ef, k))
            try:
                # A decode step's few queries: one thread (waking a pool costs more than it saves).
                threads = num_threads() if len(data) >= _PARALLEL_QUERIES else 1
                labels, _ = self._index.knn_query(data, k=k, num_threads=threads)
            except RuntimeError as error:
                logger.warning("hnswlib search failed (%s); falling back to exact search", error)
                return None
        return labels.astype(np.int64, copy=False)

    def _restore_duplicates(self, scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expand each found token into itself and the tokens with the same key (same score), best
        first, keeping k per row. scores, ids (R, c) best first, c <= k."""
        if len(self._groups) == 0:
            return scores, ids
        flat = ids.numpy()
        where = np.clip(np.searchsorted(self._groups, flat), 0, len(self._groups) - 1)
        has = self._groups[where] == flat
        counts = torch.from_numpy(1 + np.where(has, self._starts[where + 1] - self._starts[where], 0))  # (R, c)
        ends = counts.cumsum(dim=1)
        assert int(ends[:, -1].min()) >= k, "fewer tokens than k behind the candidates"
        slot = torch.arange(k).expand(ids.shape[0], k).contiguous()
        source = torch.searchsorted(ends, slot, right=True)  # (R, k): which candidate fills each slot
        within = (slot - (ends - counts).gather(1, source)).numpy()  # 0: the candidate itself
        picked = flat[np.arange(len(flat))[:, None], source.numpy()]
        member = self._starts[where[np.arange(len(flat))[:, None], source.numpy()]] + within - 1
        restored = np.where(within == 0, picked, self._members[np.clip(member, 0, max(len(self._members) - 1, 0))])
        return scores.gather(1, source), torch.from_numpy(restored)
