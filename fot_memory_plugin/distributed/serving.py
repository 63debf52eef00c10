"""A DocumentMemory answering from a sharded store: the model here, the memories in Ray actors."""

from __future__ import annotations

import os

from ..documents.document_memory import DocumentMemory
from .errors import ShardCatalogError
from .sharded import ShardedStore

__all__ = ["open_sharded"]


def open_sharded(catalog: str | os.PathLike[str], *, ray_address: str | None = None, device: str | None = None,
                 threads_per_shard: int | None = None) -> DocumentMemory:
    """DocumentMemory over the shards of `catalog` (or one store), with the model they recorded.

    Use it as any DocumentMemory (ask, find_sources), or give it to FoTMemoryLLM(document_memory=...)
    or FoTMemoryIndex; closing it stops the shard actors.
    """
    store = ShardedStore.open(catalog, ray_address=ray_address, threads_per_shard=threads_per_shard)
    try:
        if store.fingerprint is None:
            raise ShardCatalogError(f"The shards of {store.path} hold no documents and record no model: read "
                                    "documents into a store first, then shard it.")
        return DocumentMemory.open(store.path, device=device, readonly=True, store=store)
    except BaseException:
        store.close()
        raise
