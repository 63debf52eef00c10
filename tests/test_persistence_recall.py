"""hnswlib (MIPS reduced to L2) against exact top-k: recall@k >= 0.95 on attention-like keys,
the same after save -> close -> reopen, and on REAL SmolLM2 keys and queries from a real book."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from persistence_helpers import synth

from fot_memory_plugin.persistence import FORMAT_VERSION, IndexParams, MemoryStore
from fot_memory_plugin.persistence.hnsw_index import HnswIndex, IndexBuilder
from fot_memory_plugin.persistence.memory import DocumentLayer, PersistentMemory

HNSW = IndexParams(kind="hnsw")  # this file tests the hnswlib index

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
    builder = IndexBuilder(64, HNSW)
    builder.add(kv[:, 0, 0])
    index, extras = builder.finish()
    for label in index.get_ids_list()[10:]:  # deleted keys leave hnswlib unable to return k results
        index.mark_deleted(label)
    part = DocumentLayer("doc", "doc", kv, "float32", [HnswIndex(index, extras, 300)])
    query = synth.queries(4, 3)[:, :3]  # (1, 3, T, D): three query heads on one KV head
    approx = PersistentMemory(0, [part], kv_heads=1, head_dim=64, exact_below=0).search(query, 50)
    exact = PersistentMemory(0, [part], kv_heads=1, head_dim=64, exact=True).search(query, 50)
    assert "falling back to exact search" in caplog.text
    assert torch.equal(approx.token_ids, exact.token_ids) and torch.equal(approx.values, exact.values)


def _recall_with_ties(queries: torch.Tensor, found_keys: torch.Tensor, exact_keys: torch.Tensor) -> float:
    """Share of found keys scoring at least the exact k-th best (identical keys tie)."""
    found = torch.einsum("bhtd,bhtkd->bhtk", queries, found_keys)
    threshold = torch.einsum("bhtd,bhtkd->bhtk", queries, exact_keys)[..., -1:]
    return (found >= threshold - 1e-4 * threshold.abs().clamp(min=1.0)).float().mean().item()


def test_identical_keys_are_collapsed_in_the_index_and_restored_in_results(tmp_path):
    """Token-determined keys (as in layer 0): 40 distinct keys over 3000 tokens."""
    rng = np.random.default_rng(0)
    vocabulary_keys, _ = synth.doc_arrays(5, 40, 0)
    tokens = rng.integers(0, 40, 3000)
    keys = vocabulary_keys[:, tokens]  # (Hkv, N, D)
    values = rng.standard_normal(keys.shape).astype(np.float32)
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint(mem_layers=[0])) as store:
        with store.begin_document("repeats", sha256="r", text_length=1, index_params=HNSW) as writer:
            for start in range(0, 3000, 512):
                writer.append(0, keys[:, start : start + 512], values[:, start : start + 512])
        layers = writer.record.index_params["layers"]["0"]
        assert layers["duplicates"] == [3000 - 40] * synth.KV_HEADS
        query = synth.queries(6, 8)
        exact = store.memory(0, exact=True).search(query, 64)
        approx = store.memory(0, exact_below=0).search(query, 64)
    assert approx.mask.all()
    assert _recall_with_ties(query, approx.keys, exact.keys) == 1.0
    ids = approx.token_ids[0].numpy()
    assert all(len(np.unique(row)) == row.size for row in ids.reshape(-1, 64)), "a token was returned twice"
    kv_head = (np.arange(synth.Q_HEADS) // (synth.Q_HEADS // synth.KV_HEADS))[:, None, None]
    assert np.array_equal(approx.values[0].numpy(), synth.stored(values)[kv_head, ids])


def test_keys_with_outlying_norms_are_scored_exactly(tmp_path):
    keys, values = synth.doc_arrays(8, 3000, 0)
    outliers = [100, 1500, 2999]
    keys[:, outliers] *= 6.0
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint(mem_layers=[0])) as store:
        with store.begin_document("outliers", sha256="o", text_length=1, index_params=HNSW) as writer:
            writer.append(0, keys, values)
        # 1% of the 2999 keys after the window's first (itself exact too), so 30 + 1.
        assert writer.record.index_params["layers"]["0"]["exact_keys"] == [31] * synth.KV_HEADS
        query = torch.from_numpy(np.repeat(keys[:, outliers].mean(1), 3, axis=0))[None, :, None]  # (1, Hq, 1, D)
        hits = store.memory(0, exact_below=0).search(query, 8)
    assert all(set(outliers) <= set(row.tolist()) for row in hits.token_ids[0, :, 0])


def _downgrade_to_format_1(path, record) -> None:
    """Rewrite a document as format 1 wrote it: raw keys under the L2 reduction, no extras files."""
    import json
    import sqlite3

    import hnswlib

    from fot_memory_plugin.persistence.files import crc32_file
    from fot_memory_plugin.persistence.kvfile import open_kv

    files = dict(record.files)
    for layer in record.layers:
        kv = open_kv(path / "docs" / record.id / f"layer{layer}.kv", record.num_tokens, record.kv_heads,
                     record.head_dim, record.dtype)
        for head in range(record.kv_heads):
            keys = kv[:, 0, head].astype(np.float32)
            norms = np.einsum("nd,nd->n", keys, keys)
            extra = np.sqrt(norms.max() - norms)[:, None]
            index = hnswlib.Index(space="l2", dim=record.head_dim + 1)
            index.init_index(max_elements=len(keys), ef_construction=100, M=16, random_seed=100)
            index.add_items(np.concatenate([keys, extra], axis=1), np.arange(len(keys)))
            file = path / "docs" / record.id / f"layer{layer}.h{head}.hnsw"
            index.save_index(str(file))
            (path / "docs" / record.id / f"layer{layer}.h{head}.extra.npz").unlink()
            del files[f"layer{layer}.h{head}.extra.npz"]
            files[file.name] = {"size": file.stat().st_size, "crc32": crc32_file(file)}
    with sqlite3.connect(path / "memory.sqlite") as conn:
        conn.execute("UPDATE documents SET files = ? WHERE id = ?", [json.dumps(files), record.id])
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")


def test_format_1_documents_are_still_searched_and_a_new_write_marks_the_store_format_2(tmp_path, caplog):
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint()) as store:
        old = synth.write_document(store, "old", 21, 3000)
    _downgrade_to_format_1(tmp_path, old)
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint()) as store:
        assert store.info()["format_version"] == 1
        query = synth.queries(31, 16)
        exact = store.memory(0, exact=True).search(query, K)
        approx = store.memory(0, exact_below=0).search(query, K)
        assert "indexed by an older fot-memory (format 1)" in caplog.text
        assert synth.recall(approx.token_ids[0].numpy(), exact.token_ids[0].numpy()) >= 0.95
        synth.write_document(store, "new", 22, 1000)
        assert store.info()["format_version"] == FORMAT_VERSION == 2


@pytest.mark.slow
@pytest.mark.parametrize("model_fixture", ["smollm2", "smollm2_fot"])
def test_recall_on_real_smollm2_queries_and_keys_of_a_real_book(model_fixture, request, tmp_path):
    """4,096 tokens of Persuasion read by SmolLM2 (keys of 6 layers into a store), or by the
    FoT-tuned model (its 5 trained layers, whose keys are harder to search); the queries are
    the real ones the model sends to memory while it continues a later passage of the book."""
    from fot_memory_plugin import MemoryConfig, MemoryEngine

    book = Path(__file__).resolve().parents[2] / "shared" / "data" / "books" / "persuasion.txt"
    if not book.exists():
        pytest.skip(f"{book} is not here")
    loaded = request.getfixturevalue(model_fixture)
    config = loaded.memory_config_for(MemoryConfig(local_window=512))
    if config.mem_layers is None:  # the zero-shot model: a spread of its 30 layers
        config = config.replace(mem_layers=(0, 5, 12, 18, 24, 29))
    layers, tokens, k = tuple(config.mem_layers), 4096, 32
    engine = MemoryEngine(loaded.model, loaded.tokenizer, config)
    try:
        ids = engine.encode(book.read_text(encoding="utf-8")[:100_000])
        captured = {layer: [] for layer in layers}
        engine.read(ids[:, :tokens], retrieve=False,
                    on_window=lambda start, end, window: [captured[layer].append(window[layer]) for layer in layers])
        seen = {layer: _Recorder(engine.memories[layer]) for layer in layers}
        engine.reset({**engine.memories, **seen})
        engine.generate(ids[:, tokens + 2048 : tokens + 2048 + 256], max_new_tokens=4, min_new_tokens=4)
    finally:
        engine.close()
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint(mem_layers=list(layers))) as store:
        with store.begin_document("persuasion", sha256="p", text_length=1, index_params=HNSW) as writer:
            for window in range(len(captured[layers[0]])):
                for layer in layers:
                    keys, values = captured[layer][window]
                    writer.append(layer, keys[0], values[0])
        recalls = {}
        for layer in layers:
            queries = torch.cat(seen[layer].queries, dim=2)  # (1, Hq, T, D): prefill and decode steps
            exact = store.memory(layer, exact=True).search(queries, k)
            approx = store.memory(layer, exact_below=0).search(queries, k)
            recalls[layer] = _recall_with_ties(queries, approx.keys.float(), exact.keys.float())
    assert sum(recalls.values()) / len(recalls) >= 0.95, recalls
    assert min(recalls.values()) >= 0.9, recalls


class _Recorder:
    """A memory that keeps the queries it is searched with, then searches the wrapped one."""

    def __init__(self, inner) -> None:
        self.inner, self.queries = inner, []

    def __len__(self) -> int:
        return len(self.inner)

    def append(self, keys, values) -> None:
        self.inner.append(keys, values)

    def search(self, queries, k):
        self.queries.append(queries.detach().float().clone())
        return self.inner.search(queries, k)


def test_keys_above_the_documents_own_norm_quantile_leave_the_graph_for_the_exact_list(tmp_path):
    """The bound is fixed on the first calibration_tokens (here larger keys than the rest); at the
    end the graph keys above the whole document's 99% norm quantile are deleted and scored exactly."""
    keys, values = synth.doc_arrays(3, 6000, 0)
    keys[:, :1024] *= 1.3
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint(mem_layers=[0])) as store:
        with store.begin_document("drift", sha256="d", text_length=1,
                                  index_params=IndexParams(kind="hnsw", calibration_tokens=1024)) as writer:
            for start in range(0, 6000, 512):
                writer.append(0, keys[:, start : start + 512], values[:, start : start + 512])
        # 1% of the keys, plus the first key of each of the 12 windows.
        assert writer.record.index_params["layers"]["0"]["exact_keys"] == [60 + 12] * synth.KV_HEADS
    with MemoryStore.open(tmp_path, readonly=True) as store:  # reloaded: deletions are saved
        indexes = store.memory(0, exact_below=0)._parts[0].indexes
        assert all(len(index.extras.deleted_ids) > 0 for index in indexes)
        assert all(index.count + len(index.extras.exact_ids) == 6000 for index in indexes)
        query = synth.queries(3, 16)
        exact = store.memory(0, exact=True).search(query, 64)
        approx = store.memory(0, exact_below=0).search(query, 64)
    assert synth.recall(approx.token_ids[0].numpy(), exact.token_ids[0].numpy()) >= 0.95


def test_the_first_key_of_every_window_is_scored_exactly(tmp_path):
    """An attention-sink-like key at each window start, off in its own direction (not by norm),
    which queries in that direction must always find."""
    keys, values = synth.doc_arrays(9, 4096, 0)
    sink = np.random.default_rng(1).standard_normal(keys.shape[2]).astype(np.float32)
    sink *= np.linalg.norm(keys, axis=2).mean() / np.linalg.norm(sink)  # an ordinary norm
    starts = np.arange(0, 4096, 256)
    keys[:, starts] = sink + 0.01 * keys[:, starts]
    with MemoryStore.open(tmp_path, fingerprint=synth.fingerprint(mem_layers=[0])) as store:
        with store.begin_document("sinks", sha256="s", text_length=1,
                                  index_params=IndexParams(kind="hnsw", calibration_tokens=1024)) as writer:
            for start in starts:
                writer.append(0, keys[:, start : start + 256], values[:, start : start + 256])
        assert all(count >= len(starts) for count in writer.record.index_params["layers"]["0"]["exact_keys"])
        query = torch.from_numpy(np.tile(sink, (synth.Q_HEADS, 1)))[None, :, None]  # (1, Hq, 1, D)
        hits = store.memory(0, exact_below=0).search(query, len(starts))
    assert all(set(starts.tolist()) == set(row.tolist()) for row in hits.token_ids[0, :, 0])
