"""Assertions shared by the persistence tests: a store is consistent and its documents unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fot_memory_plugin.persistence import MemoryStore

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
