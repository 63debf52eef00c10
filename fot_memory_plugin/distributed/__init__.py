"""Beyond one machine, on Ray (the optional extra: pip install 'fot-memory-plugin[ray]').

- `read_corpus`: one Ray task per document, each into its own staging store; the driver imports
  every finished document into the target store (the store's single writer).
- `shard_store`: split a store by document into N stores and a catalog (no Ray needed).
- `ShardedStore` / `ShardedMemory`: shards held by Ray actors, searched as one store;
  `open_sharded` gives a `DocumentMemory` over them for `ask`, `FoTMemoryLLM` and the query engine.

Ray is imported only when a function here needs it; without it they raise RayNotInstalledError.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "read_corpus",
    "CorpusReport",
    "DocumentTiming",
    "shard_store",
    "shard_paths",
    "ShardedStore",
    "ShardedMemory",
    "ShardActor",
    "open_sharded",
    "RayNotInstalledError",
    "ShardCatalogError",
    "CorpusReadError",
]

_LAZY = {
    "read_corpus": ".reading",
    "CorpusReport": ".reading",
    "DocumentTiming": ".reading",
    "shard_store": ".catalog",
    "shard_paths": ".catalog",
    "ShardedStore": ".sharded",
    "ShardedMemory": ".sharded",
    "ShardActor": ".sharded",
    "open_sharded": ".serving",
    "RayNotInstalledError": ".errors",
    "ShardCatalogError": ".errors",
    "CorpusReadError": ".errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
