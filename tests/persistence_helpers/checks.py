"""Shared by the persistence tests: a store is consistent, its documents unchanged, a file damaged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fot_memory_plugin.persistence import MemoryStore
from fot_memory_plugin.persistence.metadata import DocumentRecord

from . import synth


def snapshot(store: MemoryStore, names: list[str]) -> dict[str, tuple[np.ndarray, ...]]:
    """Exact and hnswlib search results of each named document alone (to compare later)."""
    query = synth.queries(77, 4)
    out = {}
    for name in names:
        exact = store.memory(0, [name], exact=True).search(query, 32)
        approx = store.memory(0, [name], exact_below=0).search(query, 32)
        out[name] = (exact.token_ids.numpy(), exact.values.numpy(), approx.token_ids.numpy(), approx.values.numpy())
    return out


def assert_unchanged(store: MemoryStore, before: dict[str, tuple[np.ndarray, ...]]) -> None:
    after = snapshot(store, list(before))
    for name, arrays in before.items():
        assert all(np.array_equal(a, b) for a, b in zip(arrays, after[name])), f"document {name!r} changed"


def assert_consistent(path: Path) -> None:
    """Open as a writer (which cleans up), then: no temp files, one directory per ready document,
    every document's files match their checksums."""
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        ids = sorted(record.id for record in store.documents())
        assert list((path / "tmp").iterdir()) == [], "temp files were left behind"
        assert sorted(p.name for p in (path / "docs").iterdir()) == ids, "a document directory has no row"
        assert store.verify() == {}, store.verify()


def flip_bits(store_path: Path, name: str, file_name: str, *, divisor: int = 2,
              bits: int = 0xFF) -> tuple[DocumentRecord, Path]:
    """XOR `bits` into byte len // divisor of document `name`'s file (rewritten: a new mtime and
    ctime); returns the document's record and the file's path."""
    with MemoryStore.open(store_path, readonly=True) as store:
        record = store.document(name)
    path = store_path / "docs" / record.id / file_name
    data = bytearray(path.read_bytes())
    data[len(data) // divisor] ^= bits
    path.write_bytes(bytes(data))
    return record, path
