"""Shard catalogs: which stores together make one sharded store, and splitting a store into shards.

```
OUT/
  catalog.json      {"format": "fot-memory-shards", "version": 1, "shards": ["shard-00", "shard-01"]}
  shard-00/         a store of its own (memory.sqlite, docs/...), same fingerprint as the others
  shard-01/
```

Shard paths are relative to the catalog's directory (or absolute: a catalog may also list
existing stores). Splitting copies each document into one shard with `import_document`, so it
keeps its id and creation time, and a sharded store lists and searches documents in the same
order as the store it came from. Needs no Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..persistence import DocumentRecord, MemoryStore
from ..persistence.files import fsync_dir, fsync_file
from .errors import ShardCatalogError

__all__ = ["CATALOG_NAME", "shard_paths", "write_catalog", "shard_store", "assign_shards"]

CATALOG_NAME = "catalog.json"
_FORMAT = "fot-memory-shards"


def shard_paths(catalog: str | os.PathLike[str]) -> tuple[Path, list[Path]]:
    """(catalog path, shard store paths) of a catalog file, a directory holding catalog.json, or one store."""
    path = Path(catalog).expanduser().absolute()
    if path.is_dir() and (path / "memory.sqlite").exists() and not (path / CATALOG_NAME).exists():
        return path, [path]  # one store served as one shard
    if path.is_dir():
        path = path / CATALOG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ShardCatalogError(f"No shard catalog or store at {path}: make one with `fot-memory shard STORE "
                                "--shards N OUT`, or give a store directory.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardCatalogError(f"{path} is not a shard catalog ({error}): give the catalog.json written by "
                                "`fot-memory shard`.") from None
    shards = data.get("shards") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(shards, list) or not shards:
        raise ShardCatalogError(f"{path} is not a shard catalog: it needs \"format\": \"{_FORMAT}\" and a "
                                "non-empty list \"shards\" of store paths.")
    paths = [(path.parent / shard).absolute() for shard in shards]
    missing = [str(shard) for shard in paths if not (shard / "memory.sqlite").exists()]
    if missing:
        raise ShardCatalogError(f"Shards of {path} are not stores: {missing}. Restore them or write the catalog again.")
    return path, paths


def write_catalog(directory: str | os.PathLike[str], shards: list[str]) -> Path:
    """Write directory/catalog.json listing `shards` (paths relative to it), atomically."""
    directory = Path(directory)
    final, temporary = directory / CATALOG_NAME, directory / f".{CATALOG_NAME}.tmp"
    temporary.write_text(json.dumps({"format": _FORMAT, "version": 1, "shards": shards}, indent=2) + "\n",
                         encoding="utf-8")
    fsync_file(temporary)
    os.replace(temporary, final)
    fsync_dir(directory)
    return final


def assign_shards(records: list[DocumentRecord], shards: int) -> list[list[DocumentRecord]]:
    """Documents to shards, balancing tokens: longest first onto the shard holding the fewest."""
    loads = [0] * shards
    assigned: list[list[DocumentRecord]] = [[] for _ in range(shards)]
    for record in sorted(records, key=lambda r: (-r.num_tokens, r.created, r.id)):
        target = loads.index(min(loads))
        assigned[target].append(record)
        loads[target] += record.num_tokens
    return assigned


def shard_store(source: str | os.PathLike[str], shards: int, out: str | os.PathLike[str]) -> Path:
    """Split the store at `source` by document into `shards` new stores under `out`; returns the catalog.

    `out` must not exist yet or be empty. The source is only read.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, got {shards!r}.")
    out = Path(out).expanduser().absolute()
    if out.exists() and any(out.iterdir()):
        raise ShardCatalogError(f"{out} is not empty: give a new directory for the shards.")
    with MemoryStore.open(source, create=False, readonly=True) as store:
        records = store.documents()
        if len(records) < shards:
            raise ValueError(f"{store.path} holds {len(records)} documents, fewer than {shards} shards: "
                             "a shard holds whole documents, so ask for at most that many.")
        out.mkdir(parents=True, exist_ok=True)
        names = [f"shard-{index:02d}" for index in range(shards)]
        for name, assigned in zip(names, assign_shards(records, shards)):
            with MemoryStore.open(out / name, fingerprint=store.fingerprint) as shard:
                for record in sorted(assigned, key=lambda r: (r.created, r.id)):
                    shard.import_document(store, record.id)
    return write_catalog(out, names)
