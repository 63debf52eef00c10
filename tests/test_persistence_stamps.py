"""Checksums read once, at write time: a file untouched since it was written (same inode, mtime
and ctime) is used without reading its CRC-32 again; any write to it, a copy of the store, or
verify="always" reads it again, and `verify` always does, so a flipped byte is found before it
answers or by verify."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from persistence_helpers import synth
from persistence_helpers.checks import flip_bits

import fot_memory_plugin.persistence.store as store_module
from fot_memory_plugin.persistence import CorruptDocumentError, IndexParams, MemoryStore

CLUSTERS = IndexParams(kind="clusters")


@pytest.fixture
def written(tmp_path):
    path = tmp_path / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 9000, index_params=CLUSTERS)
        synth.write_document(store, "b", 2, 3000, index_params=CLUSTERS)
    return path


@pytest.fixture
def checksums_read(monkeypatch):
    """The names of the files whose CRC-32 the store reads."""
    read = []
    original = store_module.crc32_file

    def counting(path):
        read.append(path.name)
        return original(path)

    monkeypatch.setattr(store_module, "crc32_file", counting)
    return read


def _search(path, **options):
    with MemoryStore.open(path, readonly=True, **options) as store:
        return store.memory(0, exact_below=0).search(synth.queries(3, 4), 16)


def test_files_untouched_since_they_were_written_are_not_read_again_and_answer_the_same(written, checksums_read):
    with MemoryStore.open(written, readonly=True) as store:
        stamps = [file.get("stamp") for record in store.documents() for file in record.files.values()]
    assert all(stamps)
    trusted = _search(written)
    assert checksums_read == []
    every = _search(written, verify="always")
    assert sorted(checksums_read) == ["layer0.clusters.npz", "layer0.clusters.npz", "layer0.kv", "layer0.kv"]
    assert torch.equal(trusted.token_ids, every.token_ids) and torch.equal(trusted.keys, every.keys)


def test_a_byte_flipped_in_place_is_found_before_it_is_searched(written):
    with MemoryStore.open(written, readonly=True) as store:
        target = written / "docs" / store.document("a").id / "layer0.kv"
    with open(target, "r+b") as handle:  # in place: same inode, new mtime and ctime
        handle.seek(target.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    with MemoryStore.open(written, readonly=True) as store:
        with pytest.raises(CorruptDocumentError, match="layer0.kv differs from its checksum"):
            store.memory(0, ["a"], exact_below=0)
        assert store.memory(0, ["b"], exact_below=0).search(synth.queries(1, 2), 8).mask.all()


def test_damage_that_changes_no_stamp_is_found_by_verify_and_by_verify_always(written, monkeypatch):
    record, target = flip_bits(written, "a", "layer0.kv", divisor=3, bits=0x01)
    recorded = record.files["layer0.kv"]["stamp"]
    # what the disk damaging a sector would look like: the bytes differ, the stamp does not
    monkeypatch.setattr(store_module, "file_stamp", lambda path: recorded if path == target else [0, 0, 0])
    assert _search(written).mask.all()  # trusted: the damage is not read before use
    with MemoryStore.open(written, readonly=True) as store:
        assert store.verify() == {record.id: "layer0.kv differs from its checksum"}
    with pytest.raises(CorruptDocumentError, match="layer0.kv"):
        _search(written, verify="always")


def test_a_copied_store_reads_every_checksum_once(written, tmp_path, checksums_read):
    copy = shutil.copytree(written, tmp_path / "copy")  # new inodes: the stamps no longer match
    first = _search(copy)
    assert sorted(set(checksums_read)) == ["layer0.clusters.npz", "layer0.kv"] and len(checksums_read) == 4
    assert torch.equal(first.token_ids, _search(written).token_ids)


def test_a_bad_verify_mode_lists_the_three():
    with pytest.raises(ValueError, match="'full', 'always' or 'size'"):
        MemoryStore.open("unused", verify="sometimes")


def test_hnswlib_graphs_are_still_read_before_every_first_use(tmp_path, checksums_read):
    """A damaged graph can crash hnswlib, so its checksum is read even when its stamp matches."""
    path = tmp_path / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 9000, index_params=IndexParams(kind="hnsw"))
    checksums_read.clear()
    assert _search(path).mask.all()
    assert {f"layer0.h{head}.hnsw" for head in range(synth.KV_HEADS)} <= set(checksums_read)
    assert "layer0.kv" not in checksums_read  # untouched since written
