"""Every refusal raises its own error with an actionable message, and loses nothing stored."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from persistence_helpers import synth
from persistence_helpers.checks import assert_consistent, assert_unchanged, snapshot

from fot_memory_plugin.persistence import (
    FORMAT_VERSION,
    CorruptDocumentError,
    DocumentNotFoundError,
    DuplicateDocumentError,
    FingerprintRequiredError,
    IncompatibleStoreError,
    InvalidDocumentNameError,
    MemoryStore,
    StoreError,
    StoreReadOnlyError,
    StoreVersionError,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = tmp_path_factory.mktemp("refusals") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 1200)
        synth.write_document(store, "b", 2, 900)
        baseline = snapshot(store, ["a", "b"])
    return path, baseline


@pytest.fixture
def store_path(built, tmp_path):
    return Path(shutil.copytree(built[0], tmp_path / "store"))


def _assert_intact(path: Path, baseline, names=("a", "b")) -> None:
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        assert_unchanged(store, {name: baseline[name] for name in names})


def test_other_fingerprint_names_the_differing_fields(store_path, built):
    other = synth.fingerprint(model_id="other/model", memory_config={"local_window": 512, "positional_mode": "zero",
                                                                     "mem_dtype": "float16"})
    with pytest.raises(IncompatibleStoreError) as caught:
        MemoryStore.open(store_path, fingerprint=other)
    message = str(caught.value)
    assert "model_id" in message and "memory_config.local_window" in message and "512" in message
    assert "positional_mode" not in message and "new store" in message
    assert [key for key, _, _ in caught.value.differences] == ["memory_config.local_window", "model_id"]
    with MemoryStore.open(store_path) as store:  # fingerprint=None: use the recorded one
        assert store.fingerprint == synth.fingerprint()
        with pytest.raises(FingerprintRequiredError, match="fingerprint="):
            store.begin_document("c", sha256="c", text_length=1)
    _assert_intact(store_path, built[1])


def test_newer_format_version_is_refused_untouched(store_path, built):
    with sqlite3.connect(store_path / "memory.sqlite") as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", [str(FORMAT_VERSION + 1)])
    for readonly in (True, False):
        with pytest.raises(StoreVersionError, match=f"format version {FORMAT_VERSION + 1}.*Upgrade"):
            MemoryStore.open(store_path, readonly=readonly)
    (store_path / "tmp" / "leftover").mkdir()
    with pytest.raises(StoreVersionError):
        MemoryStore.open(store_path, fingerprint=synth.fingerprint())
    assert (store_path / "tmp" / "leftover").exists(), "a refused open must not clean up"
    with sqlite3.connect(store_path / "memory.sqlite") as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", [str(FORMAT_VERSION)])
    _assert_intact(store_path, built[1])


def test_truncated_kv_file_names_the_document_and_others_still_work(store_path, built):
    with MemoryStore.open(store_path) as store:
        a = store.document("a")
        kv = store_path / "docs" / a.id / "layer0.kv"
        with open(kv, "r+b") as handle:
            handle.truncate(kv.stat().st_size - 100)
        for doc_ids in (["a"], None):
            with pytest.raises(CorruptDocumentError, match=r"'a'.*layer0.kv.*bytes.*forget") as caught:
                store.memory(0, doc_ids)
            assert caught.value.doc_id == a.id
        assert list(store.verify()) == [a.id]
        store.memory(1, ["a"]).search(synth.queries(1, 2), 4)  # its other layer is intact
    _assert_intact(store_path, built[1], names=("b",))


def test_corrupted_hnsw_file_names_the_document_and_others_still_work(store_path, built):
    with MemoryStore.open(store_path) as store:
        b = store.document("b")
        index = store_path / "docs" / b.id / "layer0.h1.hnsw"
        data = bytearray(index.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # same size, different bytes
        index.write_bytes(bytes(data))
        with pytest.raises(CorruptDocumentError, match=r"'b'.*layer0.h1.hnsw differs from its checksum"):
            store.memory(0, ["b"], exact_below=0)
        assert store.verify() == {b.id: "layer0.h1.hnsw differs from its checksum"}
        exact = store.memory(0, ["b"], exact=True).search(synth.queries(77, 4), 32)  # values are intact
        assert np.array_equal(exact.values.numpy(), built[1]["b"][1])
    _assert_intact(store_path, built[1], names=("a",))


def test_unknown_document_lists_known_names(store_path, built):
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint()) as store:
        for call in (lambda: store.document("nope"), lambda: store.memory(0, ["nope"]), lambda: store.forget("nope"),
                     lambda: store.chunks("nope")):
            with pytest.raises(DocumentNotFoundError, match=r"'nope'.*Known documents: 'a', 'b'"):
                call()
    _assert_intact(store_path, built[1])


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/b", "", "  ", "..", ".", "a\0b", "a\\b", "x" * 300, 7])
def test_names_that_escape_the_store_are_refused(store_path, built, name):
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint()) as store:
        with pytest.raises(InvalidDocumentNameError, match="plain label"):
            store.begin_document(name, sha256="x", text_length=1)
        synth.write_document(store, "fine", 3, 50, window=32)  # lock released, nothing half-made
    assert_consistent(store_path)
    _assert_intact(store_path, built[1])


def test_duplicate_name_without_force_is_refused(store_path, built):
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint()) as store:
        with pytest.raises(DuplicateDocumentError, match="force=True"):
            synth.write_document(store, "a", 9, 100)
        assert [r.name for r in store.documents()] == ["a", "b"]
    assert_consistent(store_path)
    _assert_intact(store_path, built[1])


def test_readonly_store_refuses_writes(store_path, built):
    with MemoryStore.open(store_path, readonly=True) as store:
        with pytest.raises(StoreReadOnlyError, match="readonly=False"):
            store.begin_document("c", sha256="c", text_length=1)
        with pytest.raises(StoreReadOnlyError):
            store.forget("a")
    _assert_intact(store_path, built[1])


def test_failed_or_invalid_writes_leave_nothing(store_path, built):
    keys, values = synth.doc_arrays(1, 20, 0)
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint()) as store:
        with pytest.raises(RuntimeError, match="model crashed"):
            with store.begin_document("c", sha256="c", text_length=1) as writer:
                writer.append(0, keys, values)
                raise RuntimeError("model crashed")
        with pytest.raises(ValueError, match=r"memory layers \[1\]"):
            with store.begin_document("c", sha256="c", text_length=1) as writer:
                writer.append(0, keys, values)
        with store.begin_document("c", sha256="c", text_length=1) as writer:
            with pytest.raises(ValueError, match="Hkv, D"):
                writer.append(0, keys[:2], values[:2])
            with pytest.raises(ValueError, match="not a memory layer"):
                writer.append(5, keys, values)
            with pytest.raises(ValueError, match="start < end"):
                writer.add_chunks([(5, 5, 0, 1, "x")])
            writer.abort()
        with pytest.raises(RuntimeError, match="aborted"):
            writer.append(0, keys, values)
        assert [r.name for r in store.documents()] == ["a", "b"]
    assert_consistent(store_path)
    _assert_intact(store_path, built[1])


def test_every_error_is_a_store_error():
    from fot_memory_plugin.persistence import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), StoreError)
