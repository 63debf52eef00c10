"""Windows appended as CUDA tensors (the writer stages them on the GPU and copies them off
without waiting) are stored byte for byte as the same windows appended from the CPU, whatever
the windows' sizes against the stage's; a cluster index built from the keys a GPU read keeps on
the device equals one built from the file; and cluster indexes built on the GPU (a GPU read's
commit) partition the tokens and are exact when every cluster is probed. Runs
where CUDA is; CI has none, so this ran on the GPU machine (benchmarks/README.md, "Reading into
a store on the GPU")."""

from __future__ import annotations

import pytest
import torch
from persistence_helpers import synth

import numpy as np

from fot_memory_plugin.persistence import IndexParams, MemoryStore
from fot_memory_plugin.persistence import writer as writer_module
from fot_memory_plugin.persistence.cluster_index import ClusterSearch, build_cluster_index
from fot_memory_plugin.persistence.kvfile import rows_tensor

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
@pytest.mark.parametrize("kind", ["clusters", "hnsw"])
def test_gpu_windows_are_stored_as_cpu_windows_are(tmp_path, dtype, kind):
    arrays = {layer: [torch.from_numpy(array) for array in synth.doc_arrays(3, 1800, layer)] for layer in synth.LAYERS}
    files = {}
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        for device in ("cpu", "cuda"):
            with store.begin_document(device, sha256=f"sha-{device}", text_length=7200, dtype=dtype,
                                      index_params=IndexParams(kind=kind)) as writer:
                for start in range(0, 1800, 512):
                    for layer, (keys, values) in arrays.items():
                        # A reused buffer, overwritten after each append, as a reading loop's may be.
                        buffers = [array[:, start : start + 512].clone().to(device) for array in (keys, values)]
                        writer.append(layer, *buffers)
                        for buffer in buffers:
                            buffer.fill_(float("nan"))
            files[device] = (tmp_path / "store" / "docs" / writer.record.id / "layer0.kv").read_bytes()
        query = synth.queries(1, 4)
        found = {device: store.memory(0, [device], exact_below=0).search(query, 16).token_ids
                 for device in ("cpu", "cuda")}
    assert files["cuda"] == files["cpu"]
    assert torch.equal(found["cuda"], found["cpu"])  # and the same index over them


@pytest.mark.parametrize("kind", ["clusters", "hnsw"])
def test_windows_across_the_gpu_stage_s_bounds_are_stored_in_order(tmp_path, monkeypatch, kind):
    # Stages of 300 tokens: windows of 512 and a ragged tail split across them.
    monkeypatch.setattr(writer_module, "GPU_STAGE_TOKENS", 300)
    arrays = {layer: [torch.from_numpy(array) for array in synth.doc_arrays(4, 1400, layer)] for layer in synth.LAYERS}
    files = {}
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        for device in ("cpu", "cuda"):
            with store.begin_document(device, sha256=f"sha-{device}", text_length=5600, dtype="float16",
                                      index_params=IndexParams(kind=kind)) as writer:
                for start in (0, 512, 1024, 1100):
                    end = {0: 512, 512: 1024, 1024: 1100, 1100: 1400}[start]
                    for layer, (keys, values) in arrays.items():
                        writer.append(layer, keys[:, start:end].to(device), values[:, start:end].to(device))
            files[device] = [(tmp_path / "store" / "docs" / writer.record.id / f"layer{layer}.kv").read_bytes()
                             for layer in synth.LAYERS]
    assert files["cuda"] == files["cpu"]


@pytest.mark.parametrize("kept_bytes", [0, 2_500_000, 2 << 30])  # none kept, a budget run out mid-read, all kept
def test_the_keys_a_gpu_read_keeps_for_its_cluster_index_are_the_file_s_keys(tmp_path, monkeypatch, kept_bytes):
    # (An index built from such keys equals one built from the file: test_cluster_index.py. The
    # indexes themselves are not compared here: k-means sums on a GPU in no fixed order.)
    monkeypatch.setattr(writer_module, "GPU_STAGE_TOKENS", 1024)
    monkeypatch.setattr(writer_module, "GPU_KEPT_KEYS_BYTES", kept_bytes)
    given = []

    def build(kv, dtype, starts, *, keys=None, **settings):
        given.append(None if keys is None else torch.equal(keys.cpu(), rows_tensor(kv[:, 0], dtype)))
        return build_cluster_index(kv, dtype, starts, keys=keys, **settings)

    monkeypatch.setattr(writer_module, "build_cluster_index", build)
    arrays = {layer: [torch.from_numpy(array).cuda() for array in synth.doc_arrays(6, 5000, layer)]
              for layer in synth.LAYERS}  # 1.9 MB of float16 keys per layer
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        with store.begin_document("a", sha256="sha-a", text_length=20000, index_params=IndexParams(kind="clusters"),
                                  index_device="cuda") as writer:
            for start in range(0, 5000, 512):
                for layer, (keys, values) in arrays.items():
                    writer.append(layer, keys[:, start : start + 512], values[:, start : start + 512])
    assert len(given) == len(synth.LAYERS) and all(equal in (None, True) for equal in given)
    kept = [equal is not None for equal in given]
    if kept_bytes == 2_500_000:
        assert not all(kept)  # the budget ran out for at least one layer, which read its file
    else:
        assert kept == [bool(kept_bytes)] * len(synth.LAYERS)


@pytest.mark.parametrize("kmeans", ["flat", "two-level"])
def test_cluster_indexes_built_on_the_gpu_partition_the_tokens_and_search_exactly(tmp_path, kmeans):
    tokens = 40_000  # 620 clusters: above the two-level threshold
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        record = synth.write_document(store, "a", 5, tokens, index_params=IndexParams(kind="clusters", kmeans=kmeans),
                                      index_device="cuda")
        for layer in synth.LAYERS:
            with np.load(tmp_path / "store" / "docs" / record.id / f"layer{layer}.clusters.npz") as data:
                order, offsets, starts = data["order"], data["offsets"], data["starts"]
            for head in range(synth.KV_HEADS):  # every token exactly once: in one cluster or a window start
                assert np.array_equal(np.sort(np.concatenate([order[head], starts])), np.arange(tokens))
                assert offsets[head, 0] == 0 and offsets[head, -1] == len(order[head]) and (np.diff(offsets[head]) >= 0).all()
            query = synth.queries(3, 8, layer)
            exact = store.memory(layer, exact=True).search(query, 64)
            every = store.memory(layer, exact_below=0, cluster_search=ClusterSearch(probe=1.0, shared=1.0)).search(query, 64)
            assert torch.equal(every.token_ids, exact.token_ids)
