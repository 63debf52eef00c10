"""The memory contract and the exact in-RAM memory (the reference every other memory is tested against).

A `Memory` holds, for ONE memory layer, the pre-RoPE keys and the values of every token read so
far, per key/value head. Retrieval is per query head: query head h searches the memory of KV
head h // (Hq // Hkv) (grouped-query attention).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

__all__ = ["Memory", "Retrieved", "ExactMemory", "JoinedMemory", "empty_retrieval", "exact_top_k", "merge_top_k"]


class Retrieved(NamedTuple):
    """Fixed-shape search results for queries (B, Hq, T, D) and k.

    keys, values: (B, Hq, T, k, D); mask: (B, Hq, T, k), False where nothing was found;
    token_ids: (B, Hq, T, k) int64 memory position of each hit (-1 where mask is False).
    """

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    token_ids: torch.Tensor


@runtime_checkable
class Memory(Protocol):
    """What a memory layer needs from a memory: append what was read, search it by query."""

    def __len__(self) -> int:
        """Tokens stored."""

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store keys and values (B, Hkv, T, D); keys pre-RoPE."""

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        """Top-k stored keys per query by inner product; queries (B, Hq, T, D)."""


def empty_retrieval(queries: torch.Tensor, k: int, dtype: torch.dtype | None = None) -> Retrieved:
    """The result of searching a memory that holds nothing: all-False mask, zero vectors."""
    batch, heads, length, dim = queries.shape
    dtype = dtype or queries.dtype
    vectors = queries.new_zeros((batch, heads, length, k, dim), dtype=dtype)
    mask = torch.zeros((batch, heads, length, k), dtype=torch.bool, device=queries.device)
    ids = torch.full((batch, heads, length, k), -1, dtype=torch.long, device=queries.device)
    return Retrieved(vectors, vectors.clone(), mask, ids)


def exact_top_k(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys per query by inner product, grouped-query aware.

    queries (B, Hq, T, D), keys (B, Hkv, N, D) with Hq a multiple of Hkv, k <= N.
    Returns scores and indices into N, both (B, Hq, T, k), best first.
    """
    batch, q_heads, length, dim = queries.shape
    kv_heads, stored = keys.shape[1], keys.shape[2]
    assert q_heads % kv_heads == 0 and 0 < k <= stored
    group = q_heads // kv_heads
    grouped = queries.reshape(batch, kv_heads, group * length, dim)  # (B, Hkv, G*T, D)
    scores = torch.matmul(grouped, keys.transpose(-1, -2))  # (B, Hkv, G*T, N)
    top_scores, top_ids = scores.topk(k, dim=-1)  # (B, Hkv, G*T, k)
    return (
        top_scores.reshape(batch, q_heads, length, k),
        top_ids.reshape(batch, q_heads, length, k),
    )


def gather_rows(store: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows of store (B, Hkv, N, D) at ids (B, Hq, T, k) into (B, Hq, T, k, D)."""
    batch, kv_heads, stored, dim = store.shape
    _, q_heads, length, k = ids.shape
    group = q_heads // kv_heads
    # Flat row index: ((b * Hkv) + kv_head) * N + id, with kv_head = q_head // group.
    kv_head = torch.arange(q_heads, device=ids.device) // group  # (Hq,)
    base = (torch.arange(batch, device=ids.device)[:, None] * kv_heads + kv_head[None, :]) * stored  # (B, Hq)
    flat = (base[:, :, None, None] + ids).reshape(-1)
    return store.reshape(-1, dim).index_select(0, flat).reshape(batch, q_heads, length, k, dim)


class ExactMemory:
    """Every key and value in RAM; search is an exact matmul + top-k.

    Storage grows by doubling, so appending N tokens window by window costs O(N).
    """

    def __init__(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._keys: torch.Tensor | None = None  # (B, Hkv, capacity, D)
        self._values: torch.Tensor | None = None
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def keys(self) -> torch.Tensor:
        """Stored keys (B, Hkv, N, D); empty memories raise."""
        if self._keys is None:
            raise ValueError("This memory is empty: append keys and values before reading them.")
        return self._keys[:, :, : self._size]

    @property
    def values(self) -> torch.Tensor:
        if self._values is None:
            raise ValueError("This memory is empty: append keys and values before reading them.")
        return self._values[:, :, : self._size]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if keys.dim() != 4 or keys.shape != values.shape:
            raise ValueError(
                f"append takes keys and values of one shape (B, Hkv, T, D); got {tuple(keys.shape)} "
                f"and {tuple(values.shape)}."
            )
        if self._keys is not None and keys.shape[:2] + keys.shape[3:] != self._keys.shape[:2] + self._keys.shape[3:]:
            raise ValueError(
                f"append got keys of shape {tuple(keys.shape)} but this memory holds (B, Hkv, D) = "
                f"{tuple(self._keys.shape[:2] + self._keys.shape[3:])}: use one memory per layer and batch."
            )
        device = self.device or keys.device
        keys = keys.detach().to(device=device, dtype=self.dtype)
        values = values.detach().to(device=device, dtype=self.dtype)
        self._reserve(self._size + keys.shape[2], keys)
        end = self._size + keys.shape[2]
        self._keys[:, :, self._size : end] = keys
        self._values[:, :, self._size : end] = values
        self._size = end

    def _reserve(self, needed: int, like: torch.Tensor) -> None:
        capacity = 0 if self._keys is None else self._keys.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 256)
        batch, kv_heads, _, dim = like.shape
        new_keys = like.new_empty((batch, kv_heads, new_capacity, dim))
        new_values = like.new_empty((batch, kv_heads, new_capacity, dim))
        if self._keys is not None:
            new_keys[:, :, : self._size] = self.keys
            new_values[:, :, : self._size] = self.values
        self._keys, self._values = new_keys, new_values

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        if queries.dim() != 4:
            raise ValueError(f"search takes queries (B, Hq, T, D); got shape {tuple(queries.shape)}.")
        if self._size == 0:
            return empty_retrieval(queries, k)
        keys = self.keys.to(queries.dtype)
        values = self.values.to(queries.dtype)
        if queries.shape[1] % keys.shape[1] != 0:
            raise ValueError(
                f"{queries.shape[1]} query heads cannot share {keys.shape[1]} key/value heads evenly."
            )
        found = min(k, self._size)
        _, ids = exact_top_k(queries, keys, found)
        retrieved = Retrieved(gather_rows(keys, ids), gather_rows(values, ids), torch.ones_like(ids, dtype=torch.bool), ids)
        return _pad_to_k(retrieved, k)

    def clear(self) -> None:
        self._keys = self._values = None
        self._size = 0


class JoinedMemory:
    """Two memories searched as one: per query, the top-k of both together by inner product.

    `main` is searched as it is (for example the stored documents' memory); `extra` takes the
    appends (for example the head of a long prompt, read just before answering). Hits in `extra`
    report token id -1: they are no token of `main`, so whoever maps ids to `main`'s tokens
    (sources) leaves them out.
    """

    def __init__(self, main: Memory, extra: Memory) -> None:
        self.main = main
        self.extra = extra

    def __len__(self) -> int:
        return len(self.main) + len(self.extra)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.extra.append(keys, values)

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        if len(self.extra) == 0:
            return self.main.search(queries, k)
        extra = self.extra.search(queries, k)
        extra = Retrieved(extra.keys, extra.values, extra.mask, torch.full_like(extra.token_ids, -1))
        if len(self.main) == 0:
            return extra
        return merge_top_k(queries, self.main.search(queries, k), extra, k)


def merge_top_k(queries: torch.Tensor, first: Retrieved, second: Retrieved, k: int) -> Retrieved:
    """The k best of two searches' hits for the same queries (B, Hq, T, D), by inner product."""
    keys = torch.cat([first.keys.to(queries.dtype), second.keys.to(queries.dtype)], dim=3)  # (B, Hq, T, 2k, D)
    values = torch.cat([first.values.to(queries.dtype), second.values.to(queries.dtype)], dim=3)
    mask = torch.cat([first.mask, second.mask], dim=3)  # (B, Hq, T, 2k)
    token_ids = torch.cat([first.token_ids, second.token_ids], dim=3)
    scores = torch.einsum("bhtd,bhtkd->bhtk", queries, keys).masked_fill(~mask, float("-inf"))
    top = scores.topk(k, dim=-1).indices  # (B, Hq, T, k)
    rows = top[..., None].expand(*top.shape, keys.shape[-1])
    return Retrieved(keys.gather(3, rows), values.gather(3, rows), mask.gather(3, top), token_ids.gather(3, top))


def _pad_to_k(found: Retrieved, k: int) -> Retrieved:
    """Pad hits along the k axis up to k with masked-out zeros (fixed shapes for callers)."""
    missing = k - found.mask.shape[-1]
    if missing <= 0:
        return found
    return Retrieved(
        torch.nn.functional.pad(found.keys, (0, 0, 0, missing)),
        torch.nn.functional.pad(found.values, (0, 0, 0, missing)),
        torch.nn.functional.pad(found.mask, (0, missing), value=False),
        torch.nn.functional.pad(found.token_ids, (0, missing), value=-1),
    )
