"""The writer's staging of a GPU read (kvfile.DeviceRows: rows gathered per layer where they were
computed, copied to the host every GPU_STAGE_TOKENS, keys kept there for the commit's cluster
index), run on the CPU: `_staged` is patched to stage CPU tensors, so every step but the CUDA
copy and its event runs here. The same on a GPU: tests/test_persistence_gpu_windows.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from persistence_helpers import synth

from fot_memory_plugin.persistence import IndexParams, MemoryStore
from fot_memory_plugin.persistence import writer as writer_module
from fot_memory_plugin.persistence.cluster_index import ClusterSearch, build_cluster_index
from fot_memory_plugin.persistence.kvfile import DeviceRows, rows_tensor

TOKENS = 1400
WINDOWS = ((0, 512), (512, 1024), (1024, 1100), (1100, 1400))  # a short window and a ragged tail


def _arrays(seed: int, tokens: int = TOKENS) -> dict[int, list[torch.Tensor]]:
    return {layer: [torch.from_numpy(array) for array in synth.doc_arrays(seed, tokens, layer)] for layer in synth.LAYERS}


def _write(store: MemoryStore, name: str, arrays: dict, windows, *, dtype: str = "float16", kind: str = "clusters",
           unstaged_from: int | None = None) -> list[bytes]:
    """Write arrays window by window; windows from `unstaged_from` on go as numpy arrays (not staged)."""
    with store.begin_document(name, sha256=f"sha-{name}", text_length=4 * TOKENS, dtype=dtype,
                              index_params=IndexParams(kind=kind)) as writer:
        for start, end in windows:
            for layer, (keys, values) in arrays.items():
                window = keys[:, start:end], values[:, start:end]
                if unstaged_from is not None and start >= unstaged_from:
                    window = tuple(part.numpy() for part in window)
                writer.append(layer, *window)
    return [(store.path / "docs" / writer.record.id / f"layer{layer}.kv").read_bytes() for layer in synth.LAYERS]


@pytest.fixture
def staged(monkeypatch):
    """Stage CPU tensors as a GPU read's are; numpy arrays still take the direct path."""
    monkeypatch.setattr(writer_module, "_staged", lambda keys: isinstance(keys, torch.Tensor))
    monkeypatch.setattr(writer_module, "GPU_STAGE_TOKENS", 300)
    return monkeypatch


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "int8"])
@pytest.mark.parametrize("kind", ["clusters", "hnsw"])
def test_staged_windows_are_stored_as_direct_ones_across_the_stage_s_bounds(tmp_path, staged, dtype, kind):
    arrays = _arrays(4)
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        direct = _write(store, "direct", arrays, WINDOWS, dtype=dtype, kind=kind, unstaged_from=0)
        through_stage = _write(store, "staged", arrays, WINDOWS, dtype=dtype, kind=kind)
        # Staged windows then direct ones: the staged rows reach the file first.
        mixed = _write(store, "mixed", arrays, WINDOWS, dtype=dtype, kind=kind, unstaged_from=1024)
        query = synth.queries(1, 4)
        found = [store.memory(0, [name], exact_below=0).search(query, 16).token_ids
                 for name in ("direct", "staged", "mixed")]
    assert through_stage == direct and mixed == direct
    assert torch.equal(found[0], found[1]) and torch.equal(found[0], found[2])


@pytest.mark.parametrize("kept_bytes", [0, 1_200_000, 2 << 30])  # none kept, a budget run out mid-read, all kept
def test_the_keys_kept_for_the_cluster_index_are_the_file_s_keys(tmp_path, staged, kept_bytes):
    staged.setattr(writer_module, "GPU_KEPT_KEYS_BYTES", kept_bytes)
    given = []

    def build(kv, dtype, starts, *, keys=None, **settings):
        given.append(None if keys is None else torch.equal(keys, rows_tensor(kv[:, 0], dtype)))
        return build_cluster_index(kv, dtype, starts, keys=keys, **settings)

    staged.setattr(writer_module, "build_cluster_index", build)
    arrays = _arrays(6, 2400)  # 922 KB of float16 keys per layer: 1.2 MB hold one layer, not both
    with MemoryStore.open(tmp_path / "store", fingerprint=synth.fingerprint()) as store:
        _write(store, "a", arrays, [(start, start + 512) for start in range(0, 2400, 512)])
        query = synth.queries(3, 8)
        exact = store.memory(0, exact=True).search(query, 64)
        every = store.memory(0, exact_below=0, cluster_search=ClusterSearch(probe=1.0, shared=1.0)).search(query, 64)
    assert torch.equal(every.token_ids, exact.token_ids)
    assert len(given) == len(synth.LAYERS) and all(equal in (None, True) for equal in given)
    kept = [equal is not None for equal in given]
    if kept_bytes == 1_200_000:
        assert kept.count(True) == 1  # the other layer ran out of room and read its file
    else:
        assert kept == [bool(kept_bytes)] * len(synth.LAYERS)


def test_device_rows_refuse_more_than_their_room_and_flush_in_the_storage_type():
    keys, values = (torch.randn(3, 200, 64) for _ in range(2))
    rows = DeviceRows("cpu", 3, 64, "bfloat16", capacity=300)
    rows.add(keys, values)
    assert rows.room == 100 and rows.used_key_bytes == 200 * 3 * 64 * 2
    with pytest.raises(ValueError, match="flush first"):
        rows.add(keys, values)
    host, ready, kept = rows.flush(keep_keys=True)
    ready.synchronize()
    assert rows.used == 0 and host.shape == (200, 2, 3, 64) and host.dtype == torch.int16
    assert torch.equal(kept, keys.transpose(0, 1).to(torch.bfloat16))
    assert np.array_equal(host.numpy().view(np.uint16)[:, 1],
                          values.transpose(0, 1).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
