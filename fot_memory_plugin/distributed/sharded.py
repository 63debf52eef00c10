"""A store split by document over Ray actors, searched as one store.

Each shard (a store of its own) is held by a `ShardActor` that opens it read-only. A
`ShardedMemory` (one memory layer over some documents) sends a search's queries to the shards
that hold those documents, all at once; each shard returns, per KV head and per document, the
candidates that `PersistentMemory.search` would merge (exact scores, token indices, stored
rows), and the driver merges them in the documents' order with the same top-k, so the hits are
the single store's (same fixed-shape contract, same token ids). `ShardedStore` has the read
side of `MemoryStore` (documents, chunks, memory, fingerprint), so `DocumentMemory`,
`FoTMemoryLLM` and the query engine use it as they use a store.

Per search (one memory layer, one chunk of query positions) the network carries, to each asked
shard, the queries (Hkv, R, D) float32 (R = query heads per KV head x positions), and back, per
document, k_d = min(k, tokens) candidates per row: a float32 score, an int64 id and a key and a
value in the storage dtype.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..persistence import DEFAULT_EXACT_BELOW, Chunk, DocumentRecord, MemoryStore, PersistentHits, PersistentMemory
from ..persistence.errors import DocumentNotFoundError, StoreReadOnlyError
from ..persistence.kvfile import rows_float32
from ..persistence.memory import _empty_hits, _pad
from ._ray import connect
from .catalog import shard_paths
from .errors import ShardCatalogError

__all__ = ["ShardActor", "ShardedStore", "ShardedMemory"]

logger = logging.getLogger(__name__)

# Per document: (scores (R, k_d) float32, token indices (R, k_d) int64, rows (R, k_d, 2, D) stored dtype).
Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]


class ShardActor:
    """Holds one shard store, read-only (run as a Ray actor: `ray.remote(ShardActor)`)."""

    def __init__(self, path: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self._store = MemoryStore.open(path, readonly=True)
        self._memories: dict[tuple, PersistentMemory] = {}

    def describe(self) -> dict[str, Any]:
        """The shard's fingerprint and ready documents."""
        return {"path": str(self._store.path), "fingerprint": self._store.fingerprint,
                "records": self._store.documents()}

    def chunks(self, doc_id: str, token_indices: list[int] | None) -> list[Chunk]:
        return self._store.chunks(doc_id, token_indices)

    def damaged(self, doc_ids: list[str]) -> dict[str, str]:
        """{doc id: problem} of the given documents whose files do not check out (MemoryStore.usable)."""
        return self._store.usable([self._store.document(doc_id) for doc_id in doc_ids])[1]

    def search(self, layer: int, doc_ids: tuple[str, ...], grouped: np.ndarray, k: int, exact: bool,
               ef: int | None, exact_below: int, merge: bool = False) -> list[list[Candidates]]:
        """Per KV head, per document of doc_ids (in that order): its candidates for queries
        grouped (Hkv, R, D) float32 and k (already clamped to the memory's size).

        merge=True: per KV head ONE list entry, this shard's own top-k over its documents, with
        ids offset by the document's start in doc_ids order and rows as float32."""
        key = (layer, doc_ids, exact, ef, exact_below)
        memory = self._memories.get(key)
        if memory is None:
            memory = self._store.memory(layer, list(doc_ids), ef=ef, exact=exact, exact_below=exact_below)
            self._memories[key] = memory
        queries = torch.from_numpy(np.array(grouped, dtype=np.float32))  # writable, (Hkv, R, D)
        replies = []
        for head in range(queries.shape[0]):
            found = memory.document_candidates(queries[head].contiguous(), head, k)
            assert [position for position, *_ in found] == list(range(len(doc_ids)))
            if merge:
                replies.append([_merge_here(found, memory.offsets, [r.dtype for r in self._records(memory)], k)])
            else:
                replies.append([(scores.numpy(), local.numpy(), rows) for _, scores, local, rows in found])
        return replies

    def _records(self, memory: PersistentMemory) -> list[DocumentRecord]:
        return [self._store.document(doc_id) for doc_id in memory.doc_ids]

    def stats(self) -> dict[str, Any]:
        """Documents, tokens and this process's resident memory (bytes; Linux)."""
        records = self._store.documents()
        return {"path": str(self._store.path), "documents": len(records),
                "tokens": sum(r.num_tokens for r in records), "rss_bytes": _rss_bytes(), "pid": os.getpid()}


def _merge_here(found: list, offsets: np.ndarray, dtypes: list[str], k: int) -> Candidates:
    """One shard's top-k over its documents' candidates: (scores, ids in the shard's doc_ids
    order (offsets), rows float32), as PersistentMemory._top_ids merges documents."""
    scores = torch.cat([scores for _, scores, _, _ in found], dim=1)
    ids = torch.cat([local + int(offsets[position]) for position, _, local, _ in found], dim=1)
    rows = torch.cat([rows_float32(rows, dtypes[position]) for position, _, _, rows in found], dim=1)
    best = scores.topk(min(k, scores.shape[1]), dim=1).indices
    picked = rows.gather(1, best[:, :, None, None].expand(-1, -1, *rows.shape[2:]))
    return scores.gather(1, best).numpy(), ids.gather(1, best).numpy(), picked.numpy()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class ShardedStore:
    """The read side of a MemoryStore over shards held by Ray actors. A context manager.

    Example:
        with ShardedStore.open("shards/catalog.json", ray_address="auto") as store:
            hits = store.memory(layer=3).search(queries, k=32)  # queries (1, Hq, T, D)
    """

    readonly = True
    merge_in_shards = False

    def __init__(self, path: Path, ray: Any, actors: list[Any], described: list[dict[str, Any]]) -> None:
        self.path, self._ray, self._actors = path, ray, actors
        fingerprints = [d["fingerprint"] for d in described if d["records"]]
        if any(fp != fingerprints[0] for fp in fingerprints):
            raise ShardCatalogError(f"The shards of {path} were read with different models or memory configs: "
                                    "serve only stores with one fingerprint together.")
        self.fingerprint = fingerprints[0] if fingerprints else described[0]["fingerprint"]
        self._owner: dict[str, int] = {}
        self._records: list[DocumentRecord] = []
        for shard, d in enumerate(described):
            for record in d["records"]:
                if record.id in self._owner:
                    raise ShardCatalogError(f"Document {record.name!r} (id {record.id}) is in two shards of {path}: "
                                            "each document must be in one shard only.")
                self._owner[record.id] = shard
                self._records.append(record)
        self._records.sort(key=lambda record: (record.created, record.id))  # MemoryStore.documents() order
        self._chunk_cache: dict[str, list[Chunk]] = {}

    @classmethod
    def open(cls, catalog: str | os.PathLike[str], *, ray_address: str | None = None,
             threads_per_shard: int | None = None, merge_in_shards: bool = False) -> ShardedStore:
        """One actor per shard of `catalog` (a catalog.json, a directory holding one, or one store).

        threads_per_shard: torch threads of each actor's exact scans (default: this process's).
        merge_in_shards: the default of `memory(..., merge_in_shards=...)`.
        """
        path, shards = shard_paths(catalog)
        ray = connect(ray_address, "A sharded memory")
        threads = threads_per_shard or torch.get_num_threads()
        actor_class = ray.remote(ShardActor).options(num_cpus=0)
        actors = [actor_class.remote(str(shard), threads) for shard in shards]
        try:
            described = ray.get([actor.describe.remote() for actor in actors])
            store = cls(path, ray, actors, described)
            store.merge_in_shards = merge_in_shards
            return store
        except BaseException:
            for actor in actors:
                ray.kill(actor)
            raise

    def close(self) -> None:
        """Stop the shard actors."""
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []

    def __enter__(self) -> ShardedStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ShardedStore({str(self.path)!r}, shards={len(self._actors)}, documents={len(self._records)})"

    @property
    def num_shards(self) -> int:
        return len(self._actors)

    # ---- the read side of MemoryStore -------------------------------------------------------

    def documents(self) -> list[DocumentRecord]:
        return list(self._records)

    def document(self, id_or_name: str) -> DocumentRecord:
        found = [r for r in self._records if r.id == id_or_name] or [r for r in self._records if r.name == id_or_name]
        if not found:
            raise DocumentNotFoundError(id_or_name, [record.name for record in self._records])
        if len(found) > 1:
            raise ShardCatalogError(f"Several shards hold a document named {id_or_name!r} (ids "
                                    f"{[r.id for r in found]}): name it by id.")
        return found[0]

    def find_by_sha256(self, sha256: str) -> DocumentRecord | None:
        found = [record for record in self._records if record.sha256 == sha256]
        return found[-1] if found else None

    def chunks(self, id_or_name: str, token_indices: Sequence[int] | np.ndarray | None = None) -> list[Chunk]:
        record = self.document(id_or_name)
        if token_indices is not None:
            indices = np.asarray(token_indices, dtype=np.int64).reshape(-1).tolist()
            return self._ray.get(self._actors[self._owner[record.id]].chunks.remote(record.id, indices))
        if record.id not in self._chunk_cache:
            self._chunk_cache[record.id] = self._ray.get(self._actors[self._owner[record.id]].chunks.remote(record.id, None))
        return list(self._chunk_cache[record.id])

    def usable(self, records: Sequence[DocumentRecord]) -> tuple[list[DocumentRecord], dict[str, str]]:
        """As MemoryStore.usable: each shard checks its own documents' files."""
        by_shard: dict[int, list[str]] = {}
        for record in records:
            by_shard.setdefault(self._owner[record.id], []).append(record.id)
        damaged: dict[str, str] = {}
        for found in self._ray.get([self._actors[shard].damaged.remote(ids) for shard, ids in by_shard.items()]):
            damaged.update(found)
        return [record for record in records if record.id not in damaged], damaged

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "shards": self.num_shards, "fingerprint": self.fingerprint,
                "documents": len(self._records), "total_tokens": sum(r.num_tokens for r in self._records)}

    def shard_stats(self) -> list[dict[str, Any]]:
        """Per shard: path, documents, tokens, the actor's resident memory (rss_bytes) and pid."""
        return self._ray.get([actor.stats.remote() for actor in self._actors])

    def begin_document(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreReadOnlyError(str(self.path), "write a document into a sharded store (read into a store, "
                                 "then `fot-memory shard` it)")

    def forget(self, id_or_name: str) -> Any:
        raise StoreReadOnlyError(str(self.path), "forget a document of a sharded store")

    def memory(self, layer: int, doc_ids: Sequence[str | DocumentRecord] | None = None, *, ef: int | None = None,
               exact: bool = False, exact_below: int = DEFAULT_EXACT_BELOW,
               merge_in_shards: bool | None = None) -> ShardedMemory:
        """As MemoryStore.memory: one layer over some documents (ids or names; None = all).

        merge_in_shards: each shard sends back only its own top-k (k rows per shard instead of
        k per document: far less traffic with many documents per shard); the top-k scores are
        the single store's, but among keys of EQUAL score another token may be chosen. None:
        the store's default (`ShardedStore.open(..., merge_in_shards=...)`, False).
        """
        if isinstance(doc_ids, str):
            raise TypeError(f"doc_ids must be a list of ids or names, got the string {doc_ids!r}; use [{doc_ids!r}].")
        records = self.documents() if doc_ids is None else [
            key if isinstance(key, DocumentRecord) else self.document(key) for key in doc_ids]
        if len({record.id for record in records}) != len(records):
            raise ValueError(f"doc_ids {list(doc_ids or [])} name a document twice: list each once.")
        for record in records:
            if layer not in record.layers:
                raise ValueError(f"Document {record.name!r} has no memory for layer {layer}; it stores layers "
                                 f"{list(record.layers)}.")
        shapes = {(record.kv_heads, record.head_dim) for record in records}
        kv_heads, head_dim = next(iter(shapes)) if len(shapes) == 1 else (None, None)
        if len(shapes) > 1:
            raise ShardCatalogError(f"The documents have different (kv_heads, head_dim) {sorted(shapes)}.")
        owners = [self._owner[record.id] for record in records]
        merge = self.merge_in_shards if merge_in_shards is None else merge_in_shards
        return ShardedMemory(self._ray, layer, records, owners, self._actors, kv_heads=kv_heads, head_dim=head_dim,
                             ef=ef, exact=exact, exact_below=exact_below, merge_in_shards=merge)


class ShardedMemory:
    """One memory layer over documents held by shard actors; PersistentMemory's search contract."""

    def __init__(self, ray: Any, layer: int, records: Sequence[DocumentRecord], owners: Sequence[int],
                 actors: Sequence[Any], *, kv_heads: int | None, head_dim: int | None, ef: int | None,
                 exact: bool, exact_below: int, merge_in_shards: bool = False) -> None:
        self._ray, self.layer, self.merge_in_shards = ray, layer, merge_in_shards
        self.kv_heads, self.head_dim, self.ef, self.exact, self.exact_below = kv_heads, head_dim, ef, exact, exact_below
        self._records = list(records)
        self._dtypes = [record.dtype for record in self._records]
        # Per asked shard: its actor and the positions (in doc_ids order) of its documents.
        self._asked: list[tuple[Any, list[int]]] = []
        for shard in sorted(set(owners)):
            self._asked.append((actors[shard], [p for p, owner in enumerate(owners) if owner == shard]))
        sizes = [record.num_tokens for record in self._records]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    @property
    def doc_ids(self) -> tuple[str, ...]:
        return tuple(record.id for record in self._records)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (f"ShardedMemory(layer={self.layer}, documents={len(self._records)}, shards={len(self._asked)}, "
                f"tokens={len(self)})")

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        raise TypeError("A ShardedMemory is read-only: read documents into a store, then shard it.")

    _check_queries = PersistentMemory._check_queries
    split_ids = PersistentMemory.split_ids
    locate = PersistentMemory.locate

    def search(self, queries: torch.Tensor, k: int) -> PersistentHits:
        """As PersistentMemory.search: queries (1, Hq, T, D) -> hits (1, Hq, T, k, ...), best first."""
        self._check_queries(queries, k)
        if len(self) == 0 or queries.shape[2] == 0:
            return _empty_hits(queries, k)
        _, q_heads, length, dim = queries.shape
        group = q_heads // self.kv_heads
        grouped = queries[0].detach().to("cpu", torch.float32).reshape(self.kv_heads, group * length, dim)
        found = min(k, len(self))
        doc_ids = self.doc_ids
        replies = self._ray.get([
            actor.search.remote(self.layer, tuple(doc_ids[p] for p in positions), grouped.numpy(), found,
                                self.exact, self.ef, self.exact_below, self.merge_in_shards)
            for actor, positions in self._asked
        ])
        if self.merge_in_shards:
            return self._from_shard_tops(replies, queries, k, found)
        by_position: dict[int, tuple[int, int]] = {}  # document position -> (asked shard, index in its reply)
        for shard, (_, positions) in enumerate(self._asked):
            by_position.update({p: (shard, i) for i, p in enumerate(positions)})
        keys = torch.empty((self.kv_heads, group * length, found, dim))
        values = torch.empty_like(keys)
        ids = torch.empty((self.kv_heads, group * length, found), dtype=torch.long)
        for head in range(self.kv_heads):
            parts = [replies[s][head][i] for s, i in (by_position[p] for p in range(len(doc_ids)))]
            ids[head], rows = self._merge(parts, found)
            keys[head], values[head] = rows[:, :, 0], rows[:, :, 1]
        shape = (1, q_heads, length, found)
        hits = PersistentHits(
            keys.reshape(*shape, dim).to(device=queries.device, dtype=queries.dtype),
            values.reshape(*shape, dim).to(device=queries.device, dtype=queries.dtype),
            torch.ones(shape, dtype=torch.bool, device=queries.device),
            ids.reshape(shape).to(queries.device),
        )
        return _pad(hits, k)

    def _merge(self, parts: list[Candidates], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PersistentMemory._top_ids over the documents' candidates, in doc_ids order: global ids
        (R, k) and their rows (R, k, 2, D) float32."""
        # Ray hands back read-only arrays: torch.tensor copies them (scores and ids are small).
        scores = torch.cat([torch.tensor(s) for s, _, _ in parts], dim=1)  # (R, sum k_d)
        all_ids = torch.cat([torch.tensor(local) + int(offset)
                             for (_, local, _), offset in zip(parts, self.offsets[:-1])], dim=1)
        all_rows = torch.cat([rows_float32(rows, dtype) for (_, _, rows), dtype in zip(parts, self._dtypes)], dim=1)
        best = scores.topk(k, dim=1).indices  # (R, k)
        rows = all_rows.gather(1, best[:, :, None, None].expand(-1, -1, *all_rows.shape[2:]))
        return all_ids.gather(1, best), rows

    def _from_shard_tops(self, replies: list, queries: torch.Tensor, k: int, found: int) -> PersistentHits:
        """The global top-k over each shard's own top-k (merge_in_shards)."""
        _, q_heads, length, dim = queries.shape
        heads = []
        for head in range(self.kv_heads):
            scores, ids, rows = [], [], []
            for (_, positions), reply in zip(self._asked, replies):
                shard_scores, shard_ids, shard_rows = reply[head][0]
                # Shard ids count from its first asked document: map them to this memory's ids.
                starts = np.concatenate([[0], np.cumsum([self._records[p].num_tokens for p in positions])])
                owner = np.searchsorted(starts, shard_ids, side="right") - 1
                global_ids = self.offsets[np.asarray(positions)[owner]] + (shard_ids - starts[owner])
                scores.append(torch.tensor(shard_scores))
                ids.append(torch.from_numpy(global_ids))
                rows.append(torch.tensor(shard_rows))
            all_scores, all_ids, all_rows = torch.cat(scores, 1), torch.cat(ids, 1), torch.cat(rows, 1)
            best = all_scores.topk(found, dim=1).indices
            heads.append((all_ids.gather(1, best),
                          all_rows.gather(1, best[:, :, None, None].expand(-1, -1, *all_rows.shape[2:]))))
        ids = torch.stack([h[0] for h in heads])  # (Hkv, R, found)
        rows = torch.stack([h[1] for h in heads])  # (Hkv, R, found, 2, D)
        shape = (1, q_heads, length, found)
        hits = PersistentHits(
            rows[..., 0, :].reshape(*shape, dim).to(device=queries.device, dtype=queries.dtype),
            rows[..., 1, :].reshape(*shape, dim).to(device=queries.device, dtype=queries.dtype),
            torch.ones(shape, dtype=torch.bool, device=queries.device),
            ids.reshape(shape).to(queries.device),
        )
        return _pad(hits, k)
