"""The store's cluster index: written at commit from the stored keys, exact when every cluster is
probed, most of the exact top-k when 5% are, reached from `read --index` and `reindex --index`,
and a flipped byte in it is found before it is searched."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from persistence_helpers import synth
from persistence_helpers.checks import flip_bits

from fot_memory_plugin.persistence import CorruptDocumentError, IndexParams, MemoryStore
from fot_memory_plugin.persistence import cluster_index
from fot_memory_plugin.persistence.cluster_index import ClusterSearch, build_cluster_index
from fot_memory_plugin.persistence.kvfile import rows_tensor, to_storage

CLUSTERS = IndexParams(kind="clusters")
EVERY_CLUSTER = ClusterSearch(probe=1.0)


@pytest.fixture(scope="module")
def cluster_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("clusters") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 3000, index_params=CLUSTERS)
        synth.write_document(store, "b", 2, 2000, index_params=CLUSTERS)
    return path


def test_cluster_index_is_written_at_commit_and_partitions_the_tokens(cluster_store):
    with MemoryStore.open(cluster_store, readonly=True) as store:
        record = store.document("a")
    assert sorted(record.files) == ["layer0.clusters.npz", "layer0.kv", "layer1.clusters.npz", "layer1.kv"]
    assert record.index_params["kind"] == "clusters"
    with np.load(cluster_store / "docs" / record.id / "layer1.clusters.npz") as data:
        order, offsets, starts, centroids = data["order"], data["offsets"], data["starts"], data["centroids"]
    assert starts.tolist() == list(range(0, 3000, 512))  # the first token of every appended window
    assert centroids.shape == (synth.KV_HEADS, round((3000 - len(starts)) / 64), synth.HEAD_DIM)
    for head in range(synth.KV_HEADS):  # every token exactly once: in one cluster or a window start
        assert sorted(order[head].tolist() + starts.tolist()) == list(range(3000))
        assert offsets[head, 0] == 0 and offsets[head, -1] == len(order[head])


@pytest.mark.parametrize("layer", [0, 1])
def test_probing_every_cluster_equals_exact_search(cluster_store, layer):
    query = synth.queries(3, 16, layer)
    with MemoryStore.open(cluster_store, readonly=True) as store:
        exact = store.memory(layer, exact=True).search(query, 128)
        clusters = store.memory(layer, exact_below=0, cluster_search=EVERY_CLUSTER).search(query, 128)
    assert torch.equal(clusters.token_ids, exact.token_ids)
    assert torch.equal(clusters.keys, exact.keys) and torch.equal(clusters.values, exact.values)


def test_the_default_probe_finds_most_of_the_exact_top_k_one_position_at_a_time(cluster_store):
    query = synth.queries(5, 16)
    with MemoryStore.open(cluster_store, readonly=True) as store:
        exact = store.memory(0, exact=True).search(query, 32)
        memory = store.memory(0, exact_below=0)  # ClusterSearch(): 5% of the clusters per row
        found = [memory.search(query[:, :, t : t + 1], 32) for t in range(16)]  # as decoding sends them
    ids = torch.cat([hits.token_ids for hits in found], dim=2)
    assert all(hits.mask.all() for hits in found)
    for row in ids.reshape(-1, 32):
        assert len(set(row.tolist())) == 32
    assert synth.recall(ids[0].numpy(), exact.token_ids[0].numpy()) > 0.6  # chance: ~0.05


def test_a_prompt_s_rows_share_a_bounded_candidate_set(cluster_store):
    """All the rows of one search score the same clusters: each row's best in turn, at most
    `shared` of them, so a long prompt costs about what one row costs; a larger share can only
    find more of each row's exact top-k."""
    query = synth.queries(6, 16)
    with MemoryStore.open(cluster_store, readonly=True) as store:
        exact = store.memory(0, exact=True).search(query, 32).token_ids[0].numpy()
        part = store.memory(0, exact_below=0)._parts[0]
        head = part.indexes[0]
        group = synth.Q_HEADS // synth.KV_HEADS
        rows = query[0, :group].reshape(-1, synth.HEAD_DIM)  # the rows KV head 0 is searched with
        chosen = {share: head._shared_clusters(rows, 32, ClusterSearch(probe=0.05, shared=share))
                  for share in (0.05, 0.2, 1.0)}
        recalls = {share: synth.recall(store.memory(0, exact_below=0, cluster_search=ClusterSearch(0.05, share))
                                       .search(query, 32).token_ids[0].numpy(), exact)
                   for share in (0.05, 0.2, 1.0)}
    clusters = len(head._sizes)
    assert len(chosen[0.05]) == -(-clusters * 5 // 100) and len(set(chosen[0.05].tolist())) == len(chosen[0.05])
    assert len(chosen[0.2]) == -(-clusters * 20 // 100)
    assert set(chosen[0.05]) <= set(chosen[0.2]) <= set(chosen[1.0])  # taken in turn: a prefix of one order
    best = (rows @ head._centroids.T).argmax(1).numpy()
    assert set(best) <= set(chosen[0.2])  # every row's best cluster comes first
    assert recalls[0.05] <= recalls[0.2] <= recalls[1.0]


def test_two_level_k_means_assigns_almost_every_key_to_its_nearest_centroid():
    """Above _FLAT_CLUSTERS clusters k-means fits and assigns in two levels (coarse groups,
    then clusters within them): the partition stays whole, nearly every key lands in its
    nearest centroid's cluster, and probing every cluster is still exact search."""
    rng = np.random.default_rng(5)
    tokens, kv_heads, dim = 48_000, 1, 32
    centres = rng.standard_normal((700, dim)).astype(np.float32) * 4
    keys = centres[rng.integers(0, 700, tokens)] + rng.standard_normal((tokens, dim)).astype(np.float32)
    kv = np.stack([keys, keys], axis=1)[:, :, None].astype(np.float16)  # (N, 2, 1, D)
    starts = np.arange(0, tokens, 512)
    index = build_cluster_index(kv, "float16", starts, cluster_size=64, iterations=4, sample=16_384, seed=1)
    assert index.num_clusters > cluster_index._FLAT_CLUSTERS
    order, offsets = index.order[0], index.offsets[0]
    assert sorted(order.tolist() + starts.tolist()) == list(range(tokens))
    stored = torch.from_numpy(kv[:, 0, 0].astype(np.float32))
    centred = stored[order] - stored[order].mean(0)
    centroids = torch.from_numpy(index.centroids[0].astype(np.float32))
    nearest = ((centred @ centroids.T) - 0.5 * (centroids * centroids).sum(1)).argmax(1).numpy()
    assigned = np.repeat(np.arange(index.num_clusters), np.diff(offsets))
    assert (nearest == assigned).mean() > 0.95
    queries = torch.from_numpy(rng.standard_normal((6, dim)).astype(np.float32))
    scores, ids = index.head(0).search(queries, 50, ClusterSearch(probe=1.0),
                                       lambda tokens_: stored[torch.from_numpy(tokens_)])
    assert torch.equal(ids, (queries @ stored.T).topk(50, dim=1).indices)


def test_a_k_larger_than_the_probed_clusters_hold_still_fills_every_slot(cluster_store):
    with MemoryStore.open(cluster_store, readonly=True) as store:
        found = store.memory(0, ["b"], exact_below=0, cluster_search=ClusterSearch(probe=0.001)).search(
            synth.queries(2, 4), 700)
    assert found.mask.all() and (found.token_ids < 2000).all()


def test_cluster_index_building_is_deterministic():
    keys, values = synth.doc_arrays(7, 1500, 0)
    kv = np.stack([keys, values], axis=0).transpose(2, 0, 1, 3).astype(np.float16)  # (N, 2, Hkv, D)
    built = [build_cluster_index(kv, "float16", np.arange(0, 1500, 512), cluster_size=64, iterations=4,
                                 sample=1000, seed=3) for _ in range(2)]
    assert np.array_equal(built[0].order, built[1].order)
    assert np.array_equal(built[0].centroids, built[1].centroids)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_an_index_built_from_keys_held_in_memory_equals_one_built_from_the_file(dtype):
    # What a GPU read's commit does with the keys it kept on the device (here on the CPU).
    keys, values = synth.doc_arrays(7, 1500, 0)
    rows = np.stack([keys, values], axis=0).transpose(2, 0, 1, 3)
    kv = to_storage(rows, dtype)
    settings = dict(cluster_size=64, iterations=4, sample=1000, seed=3)
    from_file = build_cluster_index(kv, dtype, np.arange(0, 1500, 512), **settings)
    held = rows_tensor(kv[:, 0], dtype)  # (N, Hkv, D) in the stored type
    from_keys = build_cluster_index(kv, dtype, np.arange(0, 1500, 512), keys=held, **settings)
    for name in ("centroids", "order", "offsets", "starts"):
        assert np.array_equal(getattr(from_file, name), getattr(from_keys, name)), name
    with pytest.raises(ValueError, match="do not fit"):
        build_cluster_index(kv, dtype, np.arange(0, 1500, 512), keys=held[:-1], **settings)


def test_reindex_switches_between_hnsw_and_clusters_without_changing_exact_answers(tmp_path):
    query = synth.queries(4, 8)
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 3000)
        before = store.memory(0, exact=True).search(query, 64)
        record = store.reindex("a", window=512, index_params=CLUSTERS)
        assert not any(name.endswith((".hnsw", ".extra.npz")) for name in record.files)
        every = store.memory(0, exact_below=0, cluster_search=EVERY_CLUSTER).search(query, 64)
        back = store.reindex("a", window=512, index_params=IndexParams(kind="hnsw"))
        assert not any(name.endswith(".clusters.npz") for name in back.files)
        after = store.memory(0, exact=True).search(query, 64)
    assert torch.equal(before.token_ids, every.token_ids) and torch.equal(before.token_ids, after.token_ids)


def test_a_flipped_byte_in_a_cluster_index_is_found_before_it_is_searched(cluster_store, tmp_path):
    path = shutil.copytree(cluster_store, tmp_path / "store")
    flip_bits(path, "a", "layer0.clusters.npz", bits=0x40)
    with MemoryStore.open(path, readonly=True, verify="size") as store:
        with pytest.raises(CorruptDocumentError, match="layer0.clusters.npz"):
            store.memory(0, ["a"], exact_below=0)
        assert store.memory(0, ["b"], exact_below=0).search(synth.queries(1, 2), 8).mask.all()


def test_a_bad_index_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="clusters"):
        IndexParams(kind="graph")


def test_a_bad_k_means_kind_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="two-level"):
        IndexParams(kmeans="tree")
