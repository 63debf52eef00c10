"""hnswlib (MIPS reduced to L2) against exact top-k on attention-like keys: recall@k >= 0.95,
and the same after save -> close -> reopen."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from persistence_helpers import synth

from fot_memory_plugin.persistence import IndexParams, MemoryStore
from fot_memory_plugin.persistence.hnsw_index import HnswIndex, build_index
from fot_memory_plugin.persistence.memory import DocumentLayer, PersistentMemory

K = 128
TOKENS = 6000


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("recall") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "long", 21, TOKENS)
    return path


def _recall(store: MemoryStore, layer: int, **options) -> float:
    query = synth.queries(31, 32, layer)
    exact = store.memory(layer, exact=True).search(query, K)
    approx = store.memory(layer, exact_below=0, **options).search(query, K)
    assert approx.mask.all()
    return synth.recall(approx.token_ids[0].numpy(), exact.token_ids[0].numpy())


@pytest.mark.parametrize("layer", synth.LAYERS)
def test_recall_at_k_with_default_ef(store_path, layer):
    with MemoryStore.open(store_path) as store:
        assert _recall(store, layer) >= 0.95


def test_recall_after_reopen_and_ef_below_k_is_raised_to_k(store_path):
    with MemoryStore.open(store_path, readonly=True) as store:
        first = _recall(store, 0)
    with MemoryStore.open(store_path, readonly=True) as store:  # a fresh load of the saved indexes
        assert _recall(store, 0) == first >= 0.95
        assert _recall(store, 0, ef=8) >= 0.9  # ef < k is searched with ef = k


def test_exact_matches_numpy_brute_force(store_path):
    query = synth.queries(32, 8, 1)
    reference = [tuple(synth.stored(a) for a in synth.doc_arrays(21, TOKENS, 1))]
    ids, keys, values = synth.brute_force(reference, query, K)
    with MemoryStore.open(store_path, readonly=True) as store:
        hits = store.memory(1, exact=True).search(query, K)
    assert np.array_equal(hits.token_ids[0].numpy(), ids)
    assert np.array_equal(hits.keys[0].numpy(), keys) and np.array_equal(hits.values[0].numpy(), values)


def test_failed_hnsw_search_falls_back_to_exact_results(caplog):
    keys, values = synth.doc_arrays(3, 300, 0, kv_heads=1)
    kv = np.ascontiguousarray(np.stack([keys, values], axis=0).transpose(2, 0, 1, 3))  # (N, 2, Hkv, D)
    index, _ = build_index(kv, 0, "float32", IndexParams())
    for label in range(10, 300):  # deleted keys leave hnswlib unable to return k results
        index.mark_deleted(label)
    part = DocumentLayer("doc", "doc", kv, "float32", [HnswIndex(index, 300)])
    query = synth.queries(4, 3)[:, :3]  # (1, 3, T, D): three query heads on one KV head
    approx = PersistentMemory(0, [part], kv_heads=1, head_dim=64, exact_below=0).search(query, 50)
    exact = PersistentMemory(0, [part], kv_heads=1, head_dim=64, exact=True).search(query, 50)
    assert "falling back to exact search" in caplog.text
    assert torch.equal(approx.token_ids, exact.token_ids) and torch.equal(approx.values, exact.values)
