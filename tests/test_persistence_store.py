"""The persistent store: write -> close -> reopen (in a new process) -> same answers; exact search
equals a numpy brute force; multi-document merge; fixed shapes; metadata and chunks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from persistence_helpers import synth
from persistence_helpers.procs import run_worker

from fot_memory_plugin.persistence import (
    DocumentNotFoundError,
    IndexParams,
    MemoryStore,
    PersistentHits,
    StoreNotFoundError,
)
from fot_memory_plugin.persistence.cluster_index import ClusterSearch
from fot_memory_plugin.persistence.store import index_kind

K = 128


def _reference(*docs: tuple[int, int], layer: int = 0, dtype: str = "float16"):
    """[(keys, values)] as stored, for synthetic documents given as (seed, tokens)."""
    return [tuple(synth.stored(a, dtype) for a in synth.doc_arrays(seed, n, layer)) for seed, n in docs]


@pytest.fixture(scope="module")
def built_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("built") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 3000)
        synth.write_document(store, "b", 2, 2000)
    return path


@pytest.fixture
def two_docs(built_store, tmp_path):
    """A private copy of a store holding documents a (seed 1, 3000 tokens) and b (seed 2, 2000)."""
    return Path(shutil.copytree(built_store, tmp_path / "store"))


def test_reopen_in_new_process_gives_identical_results(two_docs, tmp_path):
    query = synth.queries(3, 16)
    with MemoryStore.open(two_docs, readonly=True) as store:
        approx = store.memory(0, exact_below=0).search(query, K)
        exact = store.memory(0, exact=True).search(query, K)
    run_worker("search", two_docs, 0, 3, K, tmp_path)
    for ours, file in ((approx, "hnsw.npz"), (exact, "exact.npz")):
        theirs = np.load(tmp_path / file)
        assert np.array_equal(ours.token_ids.numpy(), theirs["ids"])
        assert np.array_equal(ours.keys.numpy(), theirs["keys"])
        assert np.array_equal(ours.values.numpy(), theirs["values"])
    ids, keys, values = synth.brute_force(_reference((1, 3000), (2, 2000)), query, K)
    assert np.array_equal(exact.token_ids[0].numpy(), ids)
    assert np.array_equal(exact.keys[0].numpy(), keys)
    assert np.array_equal(exact.values[0].numpy(), values)
    assert exact.mask.all()


def test_hnsw_hits_carry_their_stored_keys_and_values(two_docs):
    query = synth.queries(4, 8)
    reference = _reference((1, 3000), (2, 2000))
    all_keys = np.concatenate([r[0] for r in reference], axis=1)  # (Hkv, N, D)
    all_values = np.concatenate([r[1] for r in reference], axis=1)
    with MemoryStore.open(two_docs) as store:
        hits = store.memory(0, exact_below=0).search(query, K)
    kv_head = (np.arange(synth.Q_HEADS) // (synth.Q_HEADS // synth.KV_HEADS))[:, None, None]
    ids = hits.token_ids[0].numpy()
    assert np.array_equal(hits.keys[0].numpy(), all_keys[kv_head, ids])
    assert np.array_equal(hits.values[0].numpy(), all_values[kv_head, ids])
    scores = np.einsum("htd,htkd->htk", query[0].numpy(), hits.keys[0].numpy())
    assert (np.diff(scores, axis=-1) <= 1e-3).all(), "hits are not best first"


def test_multi_document_merge_and_locate(two_docs):
    query = synth.queries(5, 8)
    with MemoryStore.open(two_docs) as store:
        a, b = store.document("a"), store.document("b")
        both = store.memory(1, ["b", "a"], exact=True)
        hits = both.search(synth.queries(5, 8, layer=1), K)
        ids, _, values = synth.brute_force(_reference((2, 2000), (1, 3000), layer=1), synth.queries(5, 8, layer=1), K)
        assert np.array_equal(hits.token_ids[0].numpy(), ids) and np.array_equal(hits.values[0].numpy(), values)
        assert both.doc_ids == (b.id, a.id) and len(both) == 5000
        assert both.locate([0, 1999, 2000, 4999]) == [(b.id, 0), (b.id, 1999), (a.id, 0), (a.id, 2999)]
        owner, local = both.split_ids(torch.tensor([[-1, 2500]]))
        assert owner.tolist() == [[-1, 1]] and local.tolist() == [[-1, 500]]
        with pytest.raises(ValueError, match="not in this memory"):
            both.locate([5000])
        only_a = store.memory(0, [a.id], exact_below=0).search(query, K)
        assert only_a.mask.all() and int(only_a.token_ids.max()) < 3000
        ids_a, _, _ = synth.brute_force(_reference((1, 3000)), query, K)
        assert synth.recall(only_a.token_ids[0].numpy(), ids_a) >= 0.95
        # The same hits through the two-document memory: global top-k of the union.
        union = store.memory(0, exact_below=0).search(query, K)
        ids_union, _, _ = synth.brute_force(_reference((1, 3000), (2, 2000)), query, K)
        assert synth.recall(union.token_ids[0].numpy(), ids_union) >= 0.95
        assert int(union.token_ids.max()) >= 3000, "document b never contributes"


def test_fewer_tokens_than_k_pads_with_mask_false(tmp_path):
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "tiny", 4, 50, window=16)
        hits = store.memory(0).search(synth.queries(1, 3), K)
    assert isinstance(hits, PersistentHits)
    assert hits.keys.shape == (1, 9, 3, K, 64) and hits.mask.shape == (1, 9, 3, K)
    assert hits.mask[..., :50].all() and not hits.mask[..., 50:].any()
    assert (hits.token_ids[..., 50:] == -1).all() and (hits.keys[..., 50:, :] == 0).all()
    assert sorted(hits.token_ids[0, 0, 0, :50].tolist()) == list(range(50))


def test_empty_memory_returns_all_false_mask(tmp_path):
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint()) as store:
        memory = store.memory(0)
        query = synth.queries(1, 5).to(torch.bfloat16)
        hits = memory.search(query, 16)
    assert len(memory) == 0
    assert hits.keys.shape == hits.values.shape == (1, 9, 5, 16, 64) and hits.keys.dtype == torch.bfloat16
    assert hits.mask.shape == (1, 9, 5, 16) and not hits.mask.any()
    assert hits.token_ids.dtype == torch.int64 and (hits.token_ids == -1).all()
    with MemoryStore.open(tmp_path / "bare") as bare:  # no fingerprint, no documents
        assert bare.fingerprint is None and not bare.memory(3).search(query, 4).mask.any()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_other_storage_dtypes_are_exact(tmp_path, dtype):
    query = synth.queries(2, 4)
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "d", 9, 700, dtype=dtype)
        hits = store.memory(0, exact=True).search(query.to(torch.float64), 32)
    ids, keys, values = synth.brute_force(_reference((9, 700), dtype=dtype), query, 32)
    assert hits.keys.dtype == torch.float64
    assert np.array_equal(hits.token_ids[0].numpy(), ids)
    assert np.array_equal(hits.values[0].numpy(), values.astype(np.float64))


def test_search_checks_its_inputs(two_docs):
    with MemoryStore.open(two_docs) as store:
        memory = store.memory(0)
        with pytest.raises(ValueError, match="batch size 1"):
            memory.search(torch.zeros(2, 9, 4, 64), 8)
        with pytest.raises(ValueError, match="head_dim"):
            memory.search(torch.zeros(1, 9, 4, 32), 8)
        with pytest.raises(ValueError, match="evenly"):
            memory.search(torch.zeros(1, 4, 4, 64), 8)
        with pytest.raises(TypeError, match="read-only"):
            memory.append(torch.zeros(1, 3, 4, 64), torch.zeros(1, 3, 4, 64))
        with pytest.raises(ValueError, match="no memory for layer 7"):
            store.memory(7)
        with pytest.raises(TypeError, match=r"\['a'\]"):
            store.memory(0, "a")


def test_metadata_chunks_forget_and_replace(two_docs):
    with MemoryStore.open(two_docs, fingerprint=synth.fingerprint()) as store:
        assert [r.name for r in store.documents()] == ["a", "b"]
        a = store.document("a")
        assert store.document(a.id) == a and a.num_tokens == 3000 and a.metadata == {"synthetic": "1:3000"}
        assert store.find_by_sha256(a.sha256) == a and store.find_by_sha256("nope") is None
        chunks = store.chunks("a", [0, 5, 150, 2999])
        assert [(c.start_token, c.end_token, c.text) for c in chunks] == [
            (0, 100, "chunk at 0"), (100, 200, "chunk at 100"), (2900, 3000, "chunk at 2900")]
        assert len(store.chunks("a")) == 30
        info = store.info()
        assert info["documents"] == 2 and info["total_tokens"] == 5000 and info["bytes_on_disk"] > 0
        replacement = synth.write_document(store, "a", 11, 800, force=True)
        assert [r.name for r in store.documents()] == ["b", "a"] and store.document("a") == replacement
        assert not (two_docs / "docs" / a.id).exists()
        ids, _, _ = synth.brute_force(_reference((11, 800)), synth.queries(1, 4), 16)
        assert np.array_equal(store.memory(0, ["a"], exact=True).search(synth.queries(1, 4), 16).token_ids[0], ids)
        store.forget("a")
        assert [r.name for r in store.documents()] == ["b"]
        assert sorted(p.name for p in (two_docs / "docs").iterdir()) == [store.document("b").id]
        with pytest.raises(DocumentNotFoundError, match="'b'"):
            store.memory(0, ["a"])


def test_readonly_open_of_missing_store_refuses(tmp_path):
    with pytest.raises(StoreNotFoundError, match="create=True"):
        MemoryStore.open(tmp_path / "none", readonly=True)
    with pytest.raises(StoreNotFoundError):
        MemoryStore.open(tmp_path / "none", create=False)
    assert not (tmp_path / "none").exists()


def test_reindex_rebuilds_the_indexes_from_the_stored_keys(two_docs, monkeypatch):
    query = synth.queries(3, 4)
    with MemoryStore.open(two_docs, fingerprint=synth.fingerprint()) as store:
        old = store.document("a")
        before = store.memory(0, exact=True).search(query, 32)
        spans = [(c.start_token, c.end_token, c.start_char, c.end_char, c.text) for c in store.chunks("a")]
        record = store.reindex("a", window=512, index_params=IndexParams(kind="hnsw", exact_window_starts=False))
        assert record.id != old.id and record.name == "a" and not (two_docs / "docs" / old.id).exists()
        assert (record.sha256, record.num_tokens, record.layers, record.metadata) == (
            old.sha256, old.num_tokens, old.layers, old.metadata)
        assert record.index_params["exact_window_starts"] is False
        assert [(c.start_token, c.end_token, c.start_char, c.end_char, c.text) for c in store.chunks("a")] == spans
        assert {c.doc_id for c in store.chunks("a")} == {record.id} and len(spans) == 30
        record = store.reindex(record.id, window=512)  # back to the defaults: cluster indexes
        assert record.index_params["kind"] == "clusters" and index_kind(record) == "clusters"
        assert record.index_params["layers"]["0"]["window_starts"] == [6]  # 3000 tokens, 512 per window
        after = store.memory(0, exact=True).search(query, 32)
        assert torch.equal(after.keys, before.keys) and torch.equal(after.values, before.values)
        # Synthetic Gaussian keys cluster poorly, so probe half the clusters to check the index itself.
        clusters = store.memory(0, exact_below=0, cluster_search=ClusterSearch(probe=0.5)).search(query, 32)
        assert synth.recall(clusters.token_ids[0].numpy(), after.token_ids[0].numpy()) >= 0.95

        # A re-index that fails part way leaves the document as it was.
        def fail(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr("fot_memory_plugin.persistence.writer.DocumentWriter.add_chunks", fail)
        with pytest.raises(OSError, match="disk full"):
            store.reindex("a", window=512)
        assert store.document("a") == record and sorted(p.name for p in (two_docs / "tmp").iterdir()) == []
        assert torch.equal(store.memory(0, exact=True).search(query, 32).values, before.values)
        with pytest.raises(ValueError, match="local window"):
            store.reindex("a", window=0)
        with pytest.raises(DocumentNotFoundError):
            store.reindex("nope", window=512)


def test_several_writer_threads_store_what_one_stores(tmp_path):
    """Layers spread over background threads (as when the model reads on a GPU): the same files."""
    records = {}
    for threads in (1, 3):
        with MemoryStore.open(tmp_path / str(threads), fingerprint=synth.fingerprint()) as store:
            records[threads] = synth.write_document(store, "a", 1, 3000, threads=threads)
    assert {name: file["crc32"] for name, file in records[1].files.items() if name.endswith(".kv")} == {
        name: file["crc32"] for name, file in records[3].files.items() if name.endswith(".kv")}
    assert records[1].index_params["layers"] == records[3].index_params["layers"]
    with pytest.raises(ValueError, match="threads must be an int >= 1"):
        with MemoryStore.open(tmp_path / "0", fingerprint=synth.fingerprint()) as store:
            store.begin_document("x", sha256="x", text_length=1, threads=0)


def test_kv_files_flushed_while_written_hold_the_same_bytes(tmp_path, monkeypatch):
    """A .kv file flushed to disk every few bytes as windows arrive (kvfile.SYNC_EVERY_BYTES) is
    the file written in one go and fsynced at commit; the flushes happen."""
    from fot_memory_plugin.persistence import kvfile

    flushes = []
    real_fdatasync = kvfile.os.fdatasync
    monkeypatch.setattr(kvfile.os, "fdatasync", lambda fd: (flushes.append(fd), real_fdatasync(fd)))
    records = {}
    for every in (0, 4096):
        monkeypatch.setattr(kvfile, "SYNC_EVERY_BYTES", every)
        with MemoryStore.open(tmp_path / str(every), fingerprint=synth.fingerprint()) as store:
            records[every] = synth.write_document(store, "a", 1, 3000)
        if every == 0:
            assert flushes == []
    assert {name: file["crc32"] for name, file in records[0].files.items() if name.endswith(".kv")} == {
        name: file["crc32"] for name, file in records[4096].files.items() if name.endswith(".kv")}
    windows = -(-3000 // 512)
    assert len(flushes) == windows * len(records[4096].layers)  # each window is more than 4096 bytes
    with pytest.raises(ValueError, match="sync_every is a byte count"):
        kvfile.KVFileWriter(tmp_path / "x.kv", 1, 4, "float16", sync_every=-1)
