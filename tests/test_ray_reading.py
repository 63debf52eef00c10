"""Reading a corpus as Ray tasks on a real local Ray cluster: the same files and answers as a
serial read, a killed task that costs only its own document, imports that refuse another model's
memory. A tiny random model with SmolLM2's tokenizer; real hnswlib and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence import DocumentImportError, MemoryStore
from fot_memory_plugin.persistence.files import kv_filename

pytest.importorskip("ray")
from fot_memory_plugin.distributed import read_corpus  # noqa: E402

CONFIG = MemoryConfig(local_window=64, top_k=8, mem_dtype="float16", retrieval="exact")
NAMES = ["one.txt", "two.txt", "three.txt", "four.txt"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """Four different ~350-token documents (six windows each)."""
    book = BOOK.read_text(encoding="utf-8")
    directory = tmp_path_factory.mktemp("corpus")
    paths = []
    for index, name in enumerate(NAMES):
        path = directory / name
        path.write_text(book[index * 1500 : index * 1500 + 1500], encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def serial_store(tmp_path_factory, tiny_model_dir, corpus) -> Path:
    """The reference: the four documents read one after another by DocumentMemory."""
    path = tmp_path_factory.mktemp("serial") / "store"
    with DocumentMemory.open(path, model=str(tiny_model_dir), config=CONFIG) as memory:
        for document in corpus:
            memory.read_file(document)
    return path


def _kv_bytes(store: Path) -> dict[tuple[str, int], bytes]:
    """{(document name, layer): the .kv file's bytes}."""
    with MemoryStore.open(store, readonly=True) as opened:
        return {(record.name, layer): (store / "docs" / record.id / kv_filename(layer)).read_bytes()
                for record in opened.documents() for layer in record.layers}


def _answer(store: Path) -> tuple[str, list[tuple]]:
    with DocumentMemory.open(store, readonly=True) as memory:
        answer = memory.ask(QUESTION, docs=NAMES, chat=False, max_new_tokens=6)
    return answer.text, [(s.doc, s.text, s.start_char, s.end_char, s.weight) for s in answer.sources]


def _assert_consistent(store: Path, names: set[str]) -> None:
    """Only complete documents: every file checks out, no leftovers, nothing half-imported."""
    with MemoryStore.open(store, readonly=True) as opened:
        records = opened.documents()
        assert {record.name for record in records} == names
        assert opened.verify() == {}
        assert sorted(p.name for p in (store / "docs").iterdir()) == sorted(record.id for record in records)
    assert list((store / "tmp").iterdir()) == []


def test_documents_read_as_ray_tasks_equal_a_serial_read(ray_cluster, tmp_path, tiny_model_dir, corpus, serial_store):
    target = tmp_path / "store"
    report = read_corpus(corpus, target, model=str(tiny_model_dir), config=CONFIG)
    assert sorted(report.read) == sorted(NAMES) and not report.failed and not report.skipped
    assert {timing.name for timing in report.timings} == set(NAMES)
    assert all(timing.import_s > 0 and timing.tokens > 4 * CONFIG.local_window for timing in report.timings)
    assert _kv_bytes(target) == _kv_bytes(serial_store)  # byte-identical keys and values
    with MemoryStore.open(target, readonly=True) as ray_read, MemoryStore.open(serial_store, readonly=True) as serial:
        for record in serial.documents():
            assert [c.text for c in ray_read.chunks(record.name)] == [c.text for c in serial.chunks(record.name)]
        assert ray_read.fingerprint == serial.fingerprint
    assert _answer(target) == _answer(serial_store)
    _assert_consistent(target, set(NAMES))
    assert not (tmp_path / ".store.staging").exists()  # staging stores are removed once imported

    again = read_corpus(corpus, target)  # the store's own model and config; nothing new to read
    assert sorted(again.skipped) == sorted(NAMES) and not again.read and not again.failed


def test_a_task_killed_mid_read_costs_only_its_document_and_the_rerun_completes_it(
        ray_cluster, tmp_path, tiny_model_dir, corpus, serial_store):
    def kill_two_mid_read(name: str, end: int, total: int) -> None:
        import os
        import signal

        if name == "two.txt" and end >= 3 * 64:  # three windows stored in staging, three to go
            os.kill(os.getpid(), signal.SIGKILL)

    target = tmp_path / "store"
    report = read_corpus(corpus, target, model=str(tiny_model_dir), config=CONFIG, after_window=kill_two_mid_read)
    assert list(report.failed) == ["two.txt"] and sorted(report.read) == sorted(set(NAMES) - {"two.txt"})
    _assert_consistent(target, set(NAMES) - {"two.txt"})

    rerun = read_corpus(corpus, target)
    assert rerun.read == ["two.txt"] and sorted(rerun.skipped) == sorted(set(NAMES) - {"two.txt"})
    _assert_consistent(target, set(NAMES))
    assert _kv_bytes(target) == _kv_bytes(serial_store)


def test_an_import_from_another_model_or_config_is_refused_and_changes_nothing(tmp_path, tiny_model_dir, corpus,
                                                                               serial_store):
    other = tmp_path / "other"
    with DocumentMemory.open(other, model=str(tiny_model_dir), config=CONFIG.replace(local_window=32)) as memory:
        memory.read_file(corpus[0], name="other-window.txt")
    target = tmp_path / "target"
    with MemoryStore.open(serial_store, readonly=True) as serial, MemoryStore.open(other, readonly=True) as source:
        with MemoryStore.open(target, fingerprint=serial.fingerprint) as store:
            record, copied = store.import_document(serial, "one.txt")
            assert copied
            with pytest.raises(DocumentImportError, match="local_window"):
                store.import_document(source, "other-window.txt")
            again, copied_again = store.import_document(serial, "one.txt")  # idempotent on the same text
            assert not copied_again and again.id == record.id
    _assert_consistent(target, {"one.txt"})
