"""PersistentMemory: one memory layer over some stored documents, with the core's search contract.

Each document is searched on its own (its hnswlib index or cluster index per KV head, or an exact scan of its
memory-mapped keys), the per-document candidates are re-scored by the exact inner product with
their stored keys, and one global top-k is taken over all of them. Token ids are global:
`offset of the document + token index in it`, in the order of `doc_ids`; `locate` maps them back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .cluster_index import ClusterHeadIndex, ClusterSearch
from .hnsw_index import HnswIndex, default_ef
from .kvfile import row_width, rows_float32

__all__ = ["PersistentHits", "PersistentMemory", "DocumentLayer", "DEFAULT_EXACT_BELOW"]

logger = logging.getLogger(__name__)

# Documents with fewer tokens than this are scanned exactly even when they have indexes. Measured
# (2 cores, k=128, ms per search of one layer, exact / hnswlib): 4k tokens: T=1 1.9/2.2, T=128
# 82/97; 16k tokens: T=1 7.5/3.3, T=128 98/133, T=512 737/563. Exact also has recall 1.
DEFAULT_EXACT_BELOW = 8192
_SCORE_BUDGET = 1 << 24  # float32 scores per exact-scan chunk (64 MiB)
_MAX_SCAN_ROWS = 1 << 18  # keys converted to float32 per exact-scan chunk


class PersistentHits(NamedTuple):
    """Fixed-shape search results for queries (B, Hq, T, D) and k (same fields as the core's).

    keys, values: (B, Hq, T, k, D) in the queries' dtype; mask: (B, Hq, T, k) bool, False where
    nothing was found; token_ids: (B, Hq, T, k) int64 global ids (-1 where mask is False).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor


@dataclass
class DocumentLayer:
    """One document's data for one memory layer, opened for searching."""

    doc_id: str
    name: str
    kv: np.ndarray  # (N, 2, Hkv, D) memory-mapped, storage dtype
    dtype: str
    indexes: list[HnswIndex] | list[ClusterHeadIndex] | None  # one per KV head; None: exact search only

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[0]


def _empty_hits(queries: torch.Tensor, k: int) -> PersistentHits:
    batch, heads, length, dim = queries.shape
    vectors = queries.new_zeros((batch, heads, length, k, dim))
    mask = torch.zeros((batch, heads, length, k), dtype=torch.bool, device=queries.device)
    ids = torch.full((batch, heads, length, k), -1, dtype=torch.long, device=queries.device)
    return PersistentHits(vectors, vectors.clone(), mask, ids)


def exact_scan(
    kv: np.ndarray, head: int, dtype: str, queries: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k by inner product over the keys of one head; queries (R, D) float32, k <= N.

    Returns scores (R, k) float32 and token indices (R, k) int64, best first. The keys are
    converted in chunks, so RAM stays bounded for any document length.
    """
    rows = queries.shape[0]
    chunk = max(1024, min(_MAX_SCAN_ROWS, _SCORE_BUDGET // max(rows, 1)))
    best_scores = best_ids = None
    for start in range(0, kv.shape[0], chunk):
        keys = rows_float32(kv[start : start + chunk, 0, head], dtype)  # (c, D)
        scores = queries @ keys.T  # (R, c)
        top_scores, top_ids = scores.topk(min(k, keys.shape[0]), dim=1)
        top_ids += start
        if best_scores is not None:
            top_scores = torch.cat([best_scores, top_scores], dim=1)
            top_ids = torch.cat([best_ids, top_ids], dim=1)
            top_scores, order = top_scores.topk(min(k, top_scores.shape[1]), dim=1)
            top_ids = top_ids.gather(1, order)
        best_scores, best_ids = top_scores, top_ids
    assert best_scores is not None and best_ids is not None
    return best_scores, best_ids


def _gather_keys(kv: np.ndarray, head: int, dtype: str, token_ids: np.ndarray) -> torch.Tensor:
    """Stored keys of one head at token_ids (any shape) -> (..., D) float32."""
    rows = rows_float32(kv[token_ids.reshape(-1), 0, head], dtype)
    return rows.reshape(*token_ids.shape, rows.shape[-1])


class PersistentMemory:
    """Read-only memory of one layer over stored documents (made by `MemoryStore.memory`).

    `search` is safe to call from several threads; hnswlib itself runs on every core.
    """

    def __init__(
        self,
        layer: int,
        parts: Sequence[DocumentLayer],
        *,
        kv_heads: int | None,
        head_dim: int | None,
        ef: int | None = None,
        exact: bool = False,
        exact_below: int = DEFAULT_EXACT_BELOW,
        cluster_search: ClusterSearch | None = None,
    ) -> None:
        self.layer = layer
        self.cluster_search = cluster_search or ClusterSearch()
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.ef = ef
        self.exact = exact
        self.exact_below = exact_below
        self._parts = list(parts)
        for part in self._parts:
            assert part.kv.shape[2:] == (kv_heads, row_width(part.dtype, head_dim)), (part.doc_id, part.kv.shape)
        sizes = [part.num_tokens for part in self._parts]
        # offsets[i] = global id of token 0 of document i; offsets[-1] = total tokens.
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Document ids in global-id order."""
        return tuple(part.doc_id for part in self._parts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return f"PersistentMemory(layer={self.layer}, documents={len(self._parts)}, tokens={len(self)})"

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Not supported: stored memories are read-only."""
        raise TypeError(
            "A PersistentMemory is read-only: write documents with MemoryStore.begin_document(...), "
            "or append to an in-RAM memory while reading."
        )

    def search(self, queries: torch.Tensor, k: int) -> PersistentHits:
        """Global top-k stored keys per query by inner product, over all documents of this memory.

        queries: (1, Hq, T, D), Hq a multiple of Hkv; query head h searches KV head h // (Hq // Hkv).
        Returns PersistentHits with keys/values (1, Hq, T, k, D) in queries.dtype on queries.device,
        best first; positions beyond the stored token count are masked with id -1.
        """
        self._check_queries(queries, k)
        if len(self) == 0 or queries.shape[2] == 0:
            return _empty_hits(queries, k)
        _, q_heads, length, dim = queries.shape
        group = q_heads // self.kv_heads
        grouped = queries[0].detach().to("cpu", torch.float32).reshape(self.kv_heads, group * length, dim)
        found = min(k, len(self))
        keys = torch.empty((self.kv_heads, group * length, found, dim))
        values = torch.empty_like(keys)
        ids = torch.empty((self.kv_heads, group * length, found), dtype=torch.long)
        for head in range(self.kv_heads):
            ids[head] = self._top_ids(grouped[head].contiguous(), head, found)
            self._fill(ids[head].numpy(), head, keys[head], values[head])
        shape = (1, q_heads, length, found)
        hits = PersistentHits(
            keys.reshape(*shape, dim).to(device=queries.device, dtype=queries.dtype),
            values.reshape(*shape, dim).to(device=queries.device, dtype=queries.dtype),
            torch.ones(shape, dtype=torch.bool, device=queries.device),
            ids.reshape(shape).to(queries.device),
        )
        return _pad(hits, k)

    def _check_queries(self, queries: torch.Tensor, k: int) -> None:
        if not isinstance(queries, torch.Tensor) or queries.dim() != 4:
            shape = tuple(queries.shape) if hasattr(queries, "shape") else type(queries).__name__
            raise ValueError(f"search takes queries (B, Hq, T, D) as a torch tensor; got {shape}.")
        batch, q_heads, _, dim = queries.shape
        if batch != 1:
            raise ValueError(
                f"A stored memory is one document sequence, so search takes batch size 1; got B={batch}. "
                "Search each sequence separately."
            )
        if self.head_dim is not None and dim != self.head_dim:
            raise ValueError(f"queries have head_dim {dim}, but this memory stores keys of size {self.head_dim}.")
        if self.kv_heads is not None and q_heads % self.kv_heads != 0:
            raise ValueError(f"{q_heads} query heads cannot share {self.kv_heads} key/value heads evenly.")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}.")

    def _top_ids(self, queries: torch.Tensor, head: int, k: int) -> torch.Tensor:
        """Global ids (R, k) of the top-k keys of one head over every document; queries (R, D)."""
        all_scores, all_ids = [], []
        for part, offset in zip(self._parts, self.offsets[:-1]):
            if part.num_tokens == 0:
                continue
            scores, local = self._search_part(part, head, queries, min(k, part.num_tokens))
            all_scores.append(scores)
            all_ids.append(local + int(offset))
        scores = torch.cat(all_scores, dim=1)  # (R, sum of per-document k)
        best = scores.topk(k, dim=1).indices
        return torch.cat(all_ids, dim=1).gather(1, best)

    def document_candidates(
        self, queries: torch.Tensor, head: int, k: int
    ) -> list[tuple[int, torch.Tensor, torch.Tensor, np.ndarray]]:
        """What `search` merges, per document: for queries (R, D) float32 of one KV head, a list of
        (position in doc_ids, exact scores (R, k_d), token indices in the document (R, k_d), their
        stored rows (R, k_d, 2, D) in the storage dtype), k_d = min(k, tokens of the document).

        A sharded memory (fot_memory_plugin.distributed) merges these exactly as `search` does.
        """
        found = []
        for position, part in enumerate(self._parts):
            if part.num_tokens == 0:
                continue
            scores, local = self._search_part(part, head, queries, min(k, part.num_tokens))
            rows = np.asarray(part.kv[local.numpy().reshape(-1), :, head])  # (R * k_d, 2, D)
            found.append((position, scores, local, rows.reshape(*local.shape, *rows.shape[1:])))
        return found

    def _search_part(
        self, part: DocumentLayer, head: int, queries: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores and local token ids (R, k) of one document's candidates, best first."""
        use_index = part.indexes is not None and not self.exact and part.num_tokens >= self.exact_below
        if use_index and isinstance(part.indexes[head], ClusterHeadIndex):
            return part.indexes[head].search(queries, k, self.cluster_search,
                                             lambda ids: _gather_keys(part.kv, head, part.dtype, ids))
        if use_index:
            ef = self.ef if self.ef is not None else default_ef(k)
            found = part.indexes[head].search(
                queries, k, ef, lambda ids: _gather_keys(part.kv, head, part.dtype, ids))
            if found is not None:
                return found
        return exact_scan(part.kv, head, part.dtype, queries, k)

    def _fill(self, ids: np.ndarray, head: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the stored keys and values of global ids (R, k) of one head into keys/values (R, k, D)."""
        flat_ids = ids.reshape(-1)
        flat_keys = keys.view(flat_ids.shape[0], -1)  # views: writes land in keys and values
        flat_values = values.view(flat_ids.shape[0], -1)
        if len(self._parts) == 1:
            groups = [(0, slice(None))]
        else:
            owner = np.searchsorted(self.offsets, flat_ids, side="right") - 1  # document index per hit
            groups = [(index, np.flatnonzero(owner == index)) for index in np.unique(owner)]
        for index, where in groups:
            part = self._parts[index]
            local = flat_ids[where] - self.offsets[index]
            # One read per hit gets its key and value (both in row `local` of the .kv file).
            rows = rows_float32(part.kv[local, :, head], part.dtype)  # (n, 2, D)
            into = where if isinstance(where, slice) else torch.from_numpy(where)
            flat_keys[into] = rows[:, 0]
            flat_values[into] = rows[:, 1]

    def split_ids(self, token_ids: np.ndarray | torch.Tensor | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `locate`: (document position in doc_ids, token index), same shape as token_ids.

        Ids outside [0, len(self)) (for example the -1 of masked hits) give (-1, -1).
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
        ids = np.asarray(token_ids, dtype=np.int64)
        valid = (ids >= 0) & (ids < len(self))
        owner = np.searchsorted(self.offsets, ids, side="right") - 1
        owner = np.where(valid, owner, -1)
        local = np.where(valid, ids - self.offsets[np.clip(owner, 0, None)], -1)
        return owner, local

    def locate(self, token_ids: np.ndarray | torch.Tensor | Sequence[int]) -> list[tuple[str, int]]:
        """(doc_id, token index in that document) for each global id (flattened, in order).

        Raises ValueError for ids that are not in this memory (filter hits by mask first).
        """
        owner, local = self.split_ids(token_ids)
        owner, local = owner.reshape(-1), local.reshape(-1)
        if (owner < 0).any():
            bad = np.asarray(token_ids if not isinstance(token_ids, torch.Tensor) else token_ids.cpu()).reshape(-1)
            raise ValueError(
                f"token ids {bad[owner < 0][:5].tolist()} are not in this memory of {len(self)} tokens: "
                "drop hits whose mask is False before locating them."
            )
        doc_ids = self.doc_ids
        return [(doc_ids[o], int(t)) for o, t in zip(owner.tolist(), local.tolist())]


def _pad(found: PersistentHits, k: int) -> PersistentHits:
    """Pad hits along the k axis up to k with masked-out zeros and ids -1."""
    missing = k - found.mask.shape[-1]
    if missing <= 0:
        return found
    pad = torch.nn.functional.pad
    return PersistentHits(
        pad(found.keys, (0, 0, 0, missing)),
        pad(found.values, (0, 0, 0, missing)),
        pad(found.mask, (0, missing), value=False),
        pad(found.token_ids, (0, missing), value=-1),
    )
