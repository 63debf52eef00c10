"""The cluster index of one (document, memory layer): an inverted file over its keys.

Per KV head, the document's keys (centred on their mean, as the hnswlib index centres them) are
clustered by k-means into about one cluster per `cluster_size` tokens (in two levels above 512
clusters on a CPU: IndexParams.kmeans). A search scores every centroid, keeps the best `probe`
share of the clusters for each query row (at most `shared` of them for all the rows of one
search together), and ranks every key of those clusters, plus the first key of every reading
window (an attention sink: 43% of the exact top-32 of smollm2-fot's asked queries on a whole
novel, with no cluster of its own kind), by the exact inner product with the stored keys. Given every cluster it is exact search.

File `layer<L>.clusters.npz`, next to the layer's `.kv` file (per head h):
  centroids (Hkv, C, D) float16   centred k-means centroids
  order (Hkv, N - W) int32        the clustered tokens, grouped by cluster
  offsets (Hkv, C + 1) int64      cluster c holds order[h, offsets[h, c]:offsets[h, c + 1]]
  starts (W,) int64               window starts, scored for every query

That is ~13 B per token per layer for SmolLM2 (3 KV heads x (4 B of order + 2 x 64 / 64 B of
centroid)), against ~1.1 KB for the hnswlib graphs, so a 5-layer store keeps ~3.9 KB per token.
Built from the `.kv` file alone (`build_cluster_index`), at commit or by `reindex`; measured
against hnswlib in benchmarks/README.md ("Cluster index").
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .kvfile import row_width, rows_tensor, stored_float

__all__ = ["ClusterSearch", "ClusterIndex", "ClusterHeadIndex", "build_cluster_index"]

_ASSIGN_ROWS = 4096  # keys assigned to centroids per matmul while building (on a CPU)
_GPU_ASSIGN_SCORES = 1 << 26  # on a GPU, key x centroid scores per matmul (256 MiB): fewer launches
_SCORE_BUDGET = 1 << 24  # query x candidate scores per step of a search (64 MiB)
# Up to this many clusters k-means scores every centroid for every key; above, it goes in two
# levels (a 168k-token layer has ~2,600 clusters: the commit's k-means was 12% of the reading).
_FLAT_CLUSTERS = 512
_GROUPS_TRIED = 3  # coarse groups whose clusters a key is assigned among


@dataclass(frozen=True)
class ClusterSearch:
    """How a cluster index is searched.

    probe: the share of clusters each query row ranks on its own (its best by centroid score).
    shared: the most clusters one search scores, as a share. The rows of one search (a prompt's
    tokens x the query heads of a KV head) score one candidate set together: every row's best
    cluster, then every row's second best, and so on, until `shared` of the clusters are taken or
    every row has its `probe`. A decoding step (a few rows) gets its whole probe; a question's
    prefill, whose rows' probes would together cover most of the document, gets a bounded set.
    """

    # Measured on smollm2-fot's asked queries over a whole novel (recall@32, clusters of ~64,
    # k-means on 65,536 keys x 8 iterations): 0.025: 0.943, 0.05: 0.972, 0.1: 0.990; the shipped
    # k-means (IndexParams) gives 0.967 at 0.05 (benchmarks/README.md, "Cluster index").
    probe: float = 0.05
    # The same queries searched as whole prompts send them: recall@32 0.944 at 0.2 (1.0: 0.985) in
    # half the time, and the QA benchmark's answers and sources unchanged (benchmarks/README.md,
    # "Searched as a prompt sends them").
    shared: float = 0.2
    # Prompts of ~380 tokens (benchmarks/results/novel/pp_long_prompts.json) lose more: 0.924
    # (worst layer 0.870), against 0.996 at 1.0 in 2.7x the time. Their rows' best 2-4 clusters
    # are in the set already (a per-row floor changed nothing); each row would need its own probe.

    def __post_init__(self) -> None:
        for name in ("probe", "shared"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"ClusterSearch.{name} is a share of the clusters in (0, 1], got {value!r}.")


def _kmeans(points: torch.Tensor, clusters: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means (L2) of points (n, D) float32 -> centroids (clusters, D); empty clusters
    are re-seeded from random points."""
    centroids = points[torch.randperm(len(points), generator=generator)[:clusters].to(points.device)].clone()
    for _ in range(iterations):
        nearest = _nearest(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, nearest, points)
        counts = torch.bincount(nearest, minlength=clusters).float()
        reseed = points[torch.randint(len(points), (clusters,), generator=generator).to(points.device)]
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], reseed)
    return centroids


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (L2) of each point, in chunks of rows whose scores stay in
    one reused buffer (with D = 64 the matmul is bound by writing its output: 2-3x faster than
    a fresh (32k x C) result per chunk on the CPU)."""
    half_norms = 0.5 * (centroids * centroids).sum(1)
    nearest = torch.empty(len(points), dtype=torch.long, device=points.device)
    rows = _ASSIGN_ROWS if points.device.type == "cpu" else max(_ASSIGN_ROWS, _GPU_ASSIGN_SCORES // len(centroids))
    scores = torch.empty((min(rows, len(points)), len(centroids)), device=points.device)
    for start in range(0, len(points), rows):
        part = points[start : start + rows]
        chunk = scores[: len(part)]
        torch.matmul(part, centroids.T, out=chunk)
        nearest[start : start + len(part)] = chunk.sub_(half_norms).argmax(1)
    return nearest


def _two_level_kmeans(points: torch.Tensor, clusters: int, groups: int, iterations: int,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k-means in two levels: `groups` coarse centroids, then each group's points split into a
    share of the clusters proportional to its size. Returns (centroids (C', D) listed group by
    group, C' <= clusters; the coarse centroids (G, D); group offsets (G + 1,) into centroids).
    With G ~ sqrt(C) each point is scored against a few sqrt(C) centroids instead of C."""
    coarse = _kmeans(points, groups, iterations, generator)
    member = _nearest(points, coarse)
    counts = torch.bincount(member, minlength=groups).cpu()
    # Largest remainder: the shares sum to `clusters`; a group never gets more clusters than points.
    quota = counts.double() * clusters / len(points)
    shares = quota.floor().long()
    shares[torch.argsort(quota - shares, descending=True)[: clusters - int(shares.sum())]] += 1
    shares = torch.minimum(shares.clamp(min=1), counts).tolist()
    fine = [_kmeans(points[member == group], share, iterations, generator)
            for group, share in enumerate(shares) if share]
    offsets = torch.tensor([0] + shares).cumsum(0)
    return torch.cat(fine), coarse, offsets


def _nearest_grouped(points: torch.Tensor, centroids: torch.Tensor, coarse: torch.Tensor,
                     offsets: torch.Tensor, tried: int) -> torch.Tensor:
    """The nearest centroid (L2) of each point among the groups of its `tried` nearest coarse
    centroids (the exact nearest unless it lies in a farther group)."""
    half_norms = 0.5 * (centroids * centroids).sum(1)
    coarse_scores = points @ coarse.T - 0.5 * (coarse * coarse).sum(1)
    tried = min(tried, len(coarse))
    near_groups = coarse_scores.topk(tried, dim=1).indices.reshape(-1)  # pair p: point p // tried
    # Each (point, group) pair once, grouped by group: one matmul per group over its points.
    by_group = torch.argsort(near_groups, stable=True)
    ends = torch.bincount(near_groups, minlength=len(coarse)).cumsum(0).tolist()
    best = torch.full((len(near_groups),), -math.inf, device=points.device)
    which = torch.zeros(len(near_groups), dtype=torch.long, device=points.device)
    start = 0
    for group, end in enumerate(ends):
        begin_c, end_c = int(offsets[group]), int(offsets[group + 1])
        if end > start and end_c > begin_c:
            pairs = by_group[start:end]
            top, at = (points[pairs // tried] @ centroids[begin_c:end_c].T - half_norms[begin_c:end_c]).max(1)
            best[pairs], which[pairs] = top, at + begin_c
        start = end
    pick = best.reshape(-1, tried).argmax(1, keepdim=True)
    return which.reshape(-1, tried).gather(1, pick).squeeze(1)


def build_cluster_index(kv: np.ndarray, dtype: str, starts: np.ndarray, *, cluster_size: int,
                        iterations: int, sample: int, seed: int, device: str | torch.device = "cpu",
                        two_level: bool = True, keys: torch.Tensor | None = None) -> ClusterIndex:
    """The cluster index of the stored rows kv (N, 2, Hkv, D); starts: window start tokens.
    device: where k-means runs (a GPU makes it a fraction of a second per layer); the same
    seed gives the same clusters on one device. two_level: above _FLAT_CLUSTERS clusters, fit
    and assign them in two levels (_two_level_kmeans) rather than scoring every centroid.
    keys: the same rows' keys (N, Hkv, W) in the stored type, already where k-means runs (a
    document read on a GPU keeps them there), so the file is not read back; the same index."""
    num_tokens, _, kv_heads, width = kv.shape
    dim = width - row_width(dtype, 0)  # the head dimension (int8 rows end in their scale)
    starts = np.unique(np.asarray(starts, np.int64))
    if len(starts) and (starts[0] < 0 or starts[-1] >= num_tokens):
        raise ValueError(f"window starts must lie in [0, {num_tokens}), got {starts[[0, -1]].tolist()}.")
    is_clustered = np.ones(num_tokens, bool)
    is_clustered[starts] = False
    clustered = np.flatnonzero(is_clustered)
    clusters = max(1, min(len(clustered), round(len(clustered) / cluster_size)))
    generator = torch.Generator().manual_seed(seed)
    # Every head's keys in one read of the file, converted and sorted where k-means runs: on a
    # GPU the CPU work around k-means was most of a commit (0.3 s of 0.33 at 64k tokens).
    tokens = torch.from_numpy(clustered).to(device)
    if keys is None:
        stored = rows_tensor(kv[clustered, 0], dtype).to(device)  # (n, Hkv, D) in the stored type
    else:
        if tuple(keys.shape) != (num_tokens, kv_heads, width):
            raise ValueError(f"keys {tuple(keys.shape)} do not fit the rows {tuple(kv.shape)}.")
        stored = keys.to(device)[tokens]
    fitted_per_head, order_per_head, sizes_per_head = [], [], []
    for head in range(kv_heads):
        keys = stored_float(stored[:, head], dtype)  # (n, D), a copy
        keys -= keys.mean(0) if len(keys) else 0.0
        picked = keys[torch.randperm(len(keys), generator=generator)[:sample].to(device)]
        if not len(keys):
            fitted, nearest = torch.zeros(1, dim, device=device), torch.zeros(0, dtype=torch.long, device=device)
        elif two_level and clusters > _FLAT_CLUSTERS:
            groups = max(2, round(math.sqrt(clusters)))
            fitted, coarse, group_offsets = _two_level_kmeans(picked, clusters, groups, iterations, generator)
            nearest = _nearest_grouped(keys, fitted, coarse, group_offsets, _GROUPS_TRIED)
        else:
            fitted = _kmeans(picked, clusters, iterations, generator)
            nearest = _nearest(keys, fitted)
        del keys, picked
        fitted_per_head.append(fitted.cpu())
        order_per_head.append(tokens[torch.sort(nearest, stable=True).indices].cpu().numpy())
        sizes_per_head.append(torch.bincount(nearest, minlength=len(fitted)).cpu().numpy())
    # Two-level fits may leave a head a few clusters short (a group with fewer points than its
    # share): pad with copies of its last centroid that own no tokens.
    count = max(len(fitted) for fitted in fitted_per_head)
    centroids = np.zeros((kv_heads, count, dim), np.float16)
    order = np.zeros((kv_heads, len(clustered)), np.int32)
    offsets = np.zeros((kv_heads, count + 1), np.int64)
    for head, (fitted, tokens_by_cluster, sizes) in enumerate(zip(fitted_per_head, order_per_head, sizes_per_head)):
        centroids[head, : len(fitted)] = fitted.numpy().astype(np.float16)
        centroids[head, len(fitted):] = centroids[head, len(fitted) - 1]
        order[head] = tokens_by_cluster
        offsets[head, 1 : len(sizes) + 1] = np.cumsum(sizes)
        offsets[head, len(sizes) + 1 :] = offsets[head, len(sizes)]
    return ClusterIndex(centroids, order, offsets, starts, num_tokens)


class ClusterIndex:
    """A document layer's loaded cluster index; `head(h)` is what PersistentMemory searches."""

    def __init__(self, centroids: np.ndarray, order: np.ndarray, offsets: np.ndarray, starts: np.ndarray,
                 num_tokens: int) -> None:
        kv_heads, clusters, _ = centroids.shape
        if order.shape != (kv_heads, num_tokens - len(starts)) or offsets.shape != (kv_heads, clusters + 1):
            raise ValueError(f"cluster index arrays do not fit {num_tokens} tokens and {len(starts)} window starts: "
                             f"order {order.shape}, offsets {offsets.shape}, centroids {centroids.shape}")
        if (offsets[:, 0] != 0).any() or (offsets[:, -1] != order.shape[1]).any() or (np.diff(offsets) < 0).any():
            raise ValueError("cluster index offsets are inconsistent")
        if order.size and (order.min() < 0 or order.max() >= num_tokens):
            raise ValueError("cluster index lists tokens outside the document")
        self.centroids, self.order, self.offsets = centroids, order, offsets
        self.starts = starts.astype(np.int64)
        self.num_tokens = num_tokens

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[1]

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, centroids=self.centroids, order=self.order, offsets=self.offsets, starts=self.starts)
        path.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, path: Path, num_tokens: int, kv_heads: int, head_dim: int) -> ClusterIndex:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in ("centroids", "order", "offsets", "starts")}
        if arrays["centroids"].ndim != 3 or arrays["centroids"].shape[::2] != (kv_heads, head_dim):
            raise ValueError(f"cluster index centroids have shape {arrays['centroids'].shape}, "
                             f"expected ({kv_heads}, clusters, {head_dim})")
        return cls(**arrays, num_tokens=num_tokens)

    def head(self, head: int) -> ClusterHeadIndex:
        return ClusterHeadIndex(self, head)


class ClusterHeadIndex:
    """One KV head of a ClusterIndex; searched like an HnswIndex (PersistentMemory._search_part)."""

    def __init__(self, index: ClusterIndex, head: int) -> None:
        self.num_tokens = index.num_tokens
        self._centroids = torch.from_numpy(index.centroids[head].astype(np.float32))  # (C, D)
        self._order, self._offsets = index.order[head], index.offsets[head]
        self._sizes = np.diff(self._offsets)
        self._starts = index.starts
        self._start_keys: torch.Tensor | None = None  # (W, D) float32, read on the first search
        # Enough clusters that the probed ones hold k keys even if they are the smallest.
        self._smallest_cumulative = np.cumsum(np.sort(self._sizes))

    def search(self, queries: torch.Tensor, k: int, search: ClusterSearch,
               keys_at: Callable[[np.ndarray], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k of the document's tokens by inner product for queries (R, D) float32, k <= num_tokens:
        exact scores (R, k) and token ids (R, k) int64, best first, over one candidate set shared by
        the rows (ClusterSearch says which clusters)."""
        candidates = self._members(self._shared_clusters(queries, k, search))
        if self._start_keys is None and len(self._starts):
            self._start_keys = keys_at(self._starts)
        # Candidates and window starts are ranked apart and their top-k merged: appending the
        # start keys to the candidates' copied every candidate key on every search.
        sets = [(keys_at(candidates), torch.from_numpy(candidates))]
        if self._start_keys is not None:
            sets.append((self._start_keys, torch.from_numpy(self._starts)))
        sets = [(keys, ids) for keys, ids in sets if len(ids)]
        scored = sum(len(ids) for _, ids in sets)
        found = min(k, scored)
        step = max(1, _SCORE_BUDGET // max(1, scored))
        all_scores, all_ids = [], []
        for begin in range(0, queries.shape[0], step):  # rows in chunks bound the (rows, candidates) scores
            rows = queries[begin : begin + step]
            tops = [(rows @ keys.T).topk(min(found, len(ids)), dim=1) for keys, ids in sets]
            scores = torch.cat([top.values for top in tops], dim=1)
            ids = torch.cat([set_ids[top.indices] for top, (_, set_ids) in zip(tops, sets)], dim=1)
            if len(tops) > 1:
                scores, order = scores.topk(found, dim=1)
                ids = ids.gather(1, order)
            all_scores.append(scores)
            all_ids.append(ids)
        return torch.cat(all_scores), torch.cat(all_ids)

    def _shared_clusters(self, queries: torch.Tensor, k: int, search: ClusterSearch) -> np.ndarray:
        """The clusters one search scores: the rows' best in turn (rank-major), at most search.shared of them."""
        clusters = len(self._sizes)
        # Enough clusters per row that they hold k keys even if they are the smallest.
        enough = int(np.searchsorted(self._smallest_cumulative, k)) + 1
        probed = min(clusters, max(math.ceil(search.probe * clusters), enough))
        limit = min(clusters, max(probed, math.ceil(search.shared * clusters)))
        ranked = (queries @ self._centroids.T).topk(probed, dim=1).indices  # (R, probed), best first
        in_turn = ranked.T.reshape(-1).numpy()  # every row's best, then every row's second best, ...
        _, first_seen = np.unique(in_turn, return_index=True)
        return in_turn[np.sort(first_seen)[:limit]]

    def _members(self, clusters: np.ndarray) -> np.ndarray:
        """The tokens of these clusters, sorted (so the .kv file is read in order)."""
        sizes = self._sizes[clusters]
        begins = np.repeat(self._offsets[clusters] - np.cumsum(sizes) + sizes, sizes)
        tokens = self._order[begins + np.arange(int(sizes.sum()))]
        return np.sort(tokens).astype(np.int64)
