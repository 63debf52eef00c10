"""Block retrieval: exact top-k inside the blocks of keys whose representatives score best.

The keys of one KV head are cut into consecutive blocks of `block_size` tokens, each represented
by the mean of its keys (the last block may be partial). A search scores every representative
exactly, keeps the `blocks` best per selection group (rows that share one choice, for example
all query heads of one position, or a whole chunk of positions while reading), then ranks every
key of the chosen blocks, plus a few keys scored for every query (`always`, for example the
first key of each reading window, an attention sink no mean represents), by the exact inner
product. Per query that costs N / block_size + blocks x block_size dot products instead of N,
and the result is the exact top-k whenever the chosen blocks hold it; given every block
(blocks x block_size >= N) it IS the exact top-k (tests/test_blocks.py).

InfLLM (Xiao et al., 2024) keeps one representative per 128-token block and chooses blocks once
per chunk; the blocks here are finer. `BlockMemory` uses it for reading in RAM; stores use cluster
indexes instead (persistence/cluster_index.py), because consecutive-block means found too few of
the exact top-k on real keys (benchmarks/README.md, "Cluster index").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .memory import ExactMemory, Retrieved, _pad_to_k, empty_retrieval, gather_rows

__all__ = ["BlockSearch", "BlockMemory", "block_top_k", "block_means"]

# Candidate keys materialised per step of `block_top_k` (rows x candidates x D floats, 64 MiB).
_GATHER_BUDGET = 1 << 24


@dataclass(frozen=True)
class BlockSearch:
    """How block retrieval searches (see the module docstring); measured in benchmarks/README.md."""

    block_size: int = 32
    blocks: int = 128  # blocks ranked exactly per selection group (raised to cover k)

    def __post_init__(self) -> None:
        for name in ("block_size", "blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSearch.{name} must be a positive int, got {value!r}.")

    def blocks_for(self, k: int) -> int:
        """Blocks to rank for top-k: at least one more than k keys' worth."""
        return max(self.blocks, math.ceil(k / self.block_size) + 1)


def block_means(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean key of each block of `block_size` consecutive tokens: keys (..., N, D) -> (..., ceil(N/bs), D)
    in float32; the last block's mean is over the tokens it has."""
    *lead, length, dim = keys.shape
    full, rest = divmod(length, block_size)
    keys = keys.float()
    means = keys[..., : full * block_size, :].reshape(*lead, full, block_size, dim).mean(dim=-2)
    if rest:
        means = torch.cat([means, keys[..., full * block_size :, :].mean(dim=-2, keepdim=True)], dim=-2)
    return means


def block_top_k(
    queries: torch.Tensor,
    reps: torch.Tensor,
    num_tokens: int,
    k: int,
    search: BlockSearch,
    keys_at: Callable[[torch.Tensor], torch.Tensor],
    always: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys by inner product among the best blocks and the `always` keys.

    queries: (H, G, r, D) float32: H independent key sets (KV heads), G selection groups of r
        rows; the rows of a group share one choice of blocks.
    reps: (H, NB, D) block representatives, NB = ceil(num_tokens / block_size).
    keys_at(token ids (H, G, C) int64, each < num_tokens) -> their keys (H, G, C, D) float32.
    always: (S,) int64 token ids scored for every row besides the chosen blocks, or None.
    Returns scores (H, G, r, k') and token ids (H, G, r, k') best first, k' = min(k, num_tokens);
    a slot without a candidate (only when fewer than k' were reachable) has score -inf, id -1.
    """
    heads, groups, rows, dim = queries.shape
    size = search.block_size
    num_blocks = reps.shape[1]
    assert num_blocks == math.ceil(num_tokens / size) and 0 < k
    found = min(k, num_tokens)
    chosen = min(search.blocks_for(found), num_blocks)
    device = queries.device
    if chosen == num_blocks:
        blocks = torch.arange(num_blocks, device=device).expand(heads, groups, num_blocks)
    else:
        logits = torch.matmul(queries, reps.transpose(-1, -2).unsqueeze(1)) / math.sqrt(dim)  # (H, G, r, NB)
        weight = logits.softmax(dim=-1).sum(dim=2) if rows > 1 else logits[:, :, 0]
        blocks = weight.topk(chosen, dim=-1).indices  # (H, G, n)
    ids = (blocks[..., None] * size + torch.arange(size, device=device)).reshape(heads, groups, chosen * size)  # (H, G, C)
    valid = ids < num_tokens
    if always is not None and len(always):
        valid &= ~torch.isin(ids, always)  # scored once, below
        ids = torch.cat([ids, always.expand(heads, groups, -1)], dim=-1)
        valid = torch.cat([valid, torch.ones((heads, groups, len(always)), dtype=torch.bool, device=device)], dim=-1)
    ids = ids.masked_fill(~valid, 0)
    step = max(1, _GATHER_BUDGET // (heads * ids.shape[-1] * (dim + rows)))  # groups per step
    best_scores, best_ids = [], []
    for start in range(0, groups, step):  # bounded RAM: a few groups' candidate keys at a time
        part = slice(start, start + step)
        keys = keys_at(ids[:, part])  # (H, g, C, D)
        scores = torch.matmul(queries[:, part], keys.transpose(-1, -2))  # (H, g, r, C)
        scores = scores.masked_fill(~valid[:, part, None, :], float("-inf"))
        top, order = scores.topk(found, dim=-1)
        picked = ids[:, part, None, :].expand(-1, -1, rows, -1).gather(-1, order)
        best_scores.append(top)
        best_ids.append(picked.masked_fill(torch.isinf(top), -1))
    return torch.cat(best_scores, dim=1), torch.cat(best_ids, dim=1)


class BlockMemory(ExactMemory):
    """In-RAM memory searched by block retrieval: reading with retrieval without scanning every key.

    Keeps every key and value (as ExactMemory does) plus the running sum of each block's keys;
    the first key of every appended window is scored for every query (`always`). One selection
    of blocks serves all positions of a search call (a reading chunk, or a decode step) per
    KV head and batch row, as InfLLM chooses once per chunk.
    """

    def __init__(self, search: BlockSearch | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(dtype=dtype, device=device)
        self.block_search = search or BlockSearch()
        self._sums: torch.Tensor | None = None  # (B, Hkv, blocks, D) float32
        self._starts: torch.Tensor | None = None  # (W,) first token of each appended window

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        start = len(self)
        super().append(keys, values)
        here = torch.tensor([start], device=self.keys.device)
        self._starts = here if self._starts is None else torch.cat([self._starts, here])
        size = self.block_search.block_size
        needed = math.ceil(len(self) / size)
        capacity = 0 if self._sums is None else self._sums.shape[2]
        if capacity < needed:  # grows by doubling, as the keys do
            batch, kv_heads, _, dim = self.keys.shape
            grown = torch.zeros((batch, kv_heads, max(needed, 2 * capacity), dim), device=self.keys.device)
            if self._sums is not None:
                grown[:, :, :capacity] = self._sums
            self._sums = grown
        block_of = torch.arange(start, len(self), device=self.keys.device) // size
        self._sums.index_add_(2, block_of, self.keys[:, :, start:].float())

    def clear(self) -> None:
        super().clear()
        self._sums, self._starts = None, None

    def representatives(self) -> torch.Tensor:
        """Mean key per block (B, Hkv, NB, D) float32."""
        size = self.block_search.block_size
        num_blocks = math.ceil(len(self) / size)
        counts = torch.full((num_blocks,), float(size), device=self.keys.device)
        counts[-1] = len(self) - (num_blocks - 1) * size
        return self._sums[:, :, :num_blocks] / counts[:, None]

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        if queries.dim() != 4:
            raise ValueError(f"search takes queries (B, Hq, T, D); got shape {tuple(queries.shape)}.")
        if len(self) == 0:
            return empty_retrieval(queries, k)
        batch, q_heads, length, dim = queries.shape
        # The whole (contiguous) buffers, not the first len(self) rows: a slice would be copied
        # on every search, and that copy grows with the document. Ids never reach past len(self).
        keys, values = self._keys, self._values
        kv_heads, capacity = keys.shape[1], keys.shape[2]
        if q_heads % kv_heads != 0:
            raise ValueError(f"{q_heads} query heads cannot share {kv_heads} key/value heads evenly.")
        group = q_heads // kv_heads
        # (B * Hkv) key sets, one selection group of group * T rows each.
        grouped = queries.float().reshape(batch * kv_heads, 1, group * length, dim)
        flat_keys = keys.view(batch * kv_heads, capacity, dim)

        def keys_at(ids: torch.Tensor) -> torch.Tensor:  # (H, G, C) -> (H, G, C, D) float32
            heads, groups, count = ids.shape
            rows = torch.gather(flat_keys, 1, ids.reshape(heads, -1, 1).expand(-1, -1, dim))
            return rows.float().reshape(heads, groups, count, dim)

        _, ids = block_top_k(grouped, self.representatives().reshape(batch * kv_heads, -1, dim), len(self), k,
                             self.block_search, keys_at, self._starts)
        ids = ids.reshape(batch, q_heads, length, -1)  # rows were (query head in group, position)
        mask = ids >= 0
        safe = ids.clamp(min=0)
        found = Retrieved(gather_rows(keys, safe).to(queries.dtype), gather_rows(values, safe).to(queries.dtype),
                          mask, ids)
        return _pad_to_k(found, k)
