"""Regression tests for the twelve defects of the store audit: each names its item. Real SQLite,
hnswlib and files; the CLI runs in-process over synthetic stores (no model needed) or over a
tiny random model with SmolLM2's tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from persistence_helpers import synth
from persistence_helpers.checks import assert_consistent, assert_unchanged, flip_bits, snapshot

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig
from fot_memory_plugin.apps.cli import main
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence import (
    CorruptDocumentError,
    InvalidDocumentNameError,
    MemoryStore,
    StoreDatabaseError,
    StoreDatabaseMissingError,
    StoreLockedError,
    StorePathError,
    repair_store,
)

CONFIG = MemoryConfig(local_window=64, top_k=8, mem_dtype="float16", retrieval="exact")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A synthetic store with documents "a" (1200 tokens) and "b" (9000: searched through hnswlib)."""
    path = tmp_path_factory.mktemp("audit") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "a", 1, 1200)
        synth.write_document(store, "b", 2, 9000)
        baseline = snapshot(store, ["a", "b"])
    return path, baseline


@pytest.fixture
def store_path(built, tmp_path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "store"))


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, tiny_model_dir) -> Path:
    """A store read by the tiny model from two short real documents."""
    folder = tmp_path_factory.mktemp("texts")
    text = BOOK.read_text(encoding="utf-8")
    with DocumentMemory.open(folder / "store", model=str(tiny_model_dir), config=CONFIG) as memory:
        for name, part in (("one.txt", text[:1500]), ("two.txt", text[1500:3000])):
            (folder / name).write_text(part, encoding="utf-8")
            memory.read_file(folder / name)
    return folder / "store"


def cli(capsys, *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_intact(path: Path, baseline) -> None:
    with MemoryStore.open(path, readonly=True) as store:
        assert_unchanged(store, baseline)


# 1 ------------------------------------------------------------------------------------------


def test_1_missing_database_deletes_nothing_and_repair_restores_every_document(store_path, built, capsys):
    docs_before = _tree(store_path / "docs")
    for leftover in store_path.glob("memory.sqlite*"):
        leftover.unlink()
    code, _, err = cli(capsys, "forget", "anything", "--store", store_path)
    assert code == 2 and "memory.sqlite is missing" in err and "fot-memory repair" in err
    for call in (lambda: MemoryStore.open(store_path, fingerprint=synth.fingerprint()),
                 lambda: MemoryStore.open(store_path, readonly=True)):
        with pytest.raises(StoreDatabaseMissingError, match="2 document directories"):
            call()
    assert _tree(store_path / "docs") == docs_before, "a document file was touched"

    code, out, _ = cli(capsys, "repair", "--store", store_path, "--json")
    report = json.loads(out)
    assert code == 0 and report["database"].startswith("created") and sorted(report["restored"]) == ["a", "b"]
    _assert_intact(store_path, built[1])
    assert_consistent(store_path)


def test_1_a_directory_without_a_row_is_left_alone_and_repair_adopts_it(store_path, built):
    """A database restored from an older backup: the newer document's directory survives."""
    backup = store_path.parent / "backup.sqlite"
    shutil.copy(store_path / "memory.sqlite", backup)
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint()) as store:
        newer = synth.write_document(store, "c", 3, 800)
        baseline = snapshot(store, ["c"])
    for leftover in store_path.glob("memory.sqlite*"):
        leftover.unlink()
    shutil.copy(backup, store_path / "memory.sqlite")
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint()) as store:  # writer-side open
        assert [r.name for r in store.documents()] == ["a", "b"]
    assert (store_path / "docs" / newer.id).is_dir(), "an unaccounted directory was deleted"
    report = repair_store(store_path)
    assert report.database == "sound" and report.restored == ["c"]
    with MemoryStore.open(store_path, readonly=True) as store:
        assert_unchanged(store, baseline)
    _assert_intact(store_path, built[1])


def test_1_repair_moves_what_it_cannot_account_for_to_lost_found(store_path):
    stranger = store_path / "docs" / "not-a-document"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    report = repair_store(store_path)
    assert list(report.moved_to_lost_found) == ["lost+found/not-a-document"]
    assert (store_path / "lost+found" / "not-a-document" / "notes.txt").read_text() == "mine"


# 2 ------------------------------------------------------------------------------------------


def test_2_truncated_database_is_a_named_error_and_repair_rebuilds_it(store_path, built, capsys):
    database = store_path / "memory.sqlite"
    with open(database, "r+b") as handle:
        handle.truncate(database.stat().st_size // 3)
    for command in ("docs", "info", "verify"):
        code, _, err = cli(capsys, command, "--store", store_path)
        assert code == 2 and "memory.sqlite is damaged" in err and "fot-memory repair" in err, (command, err)
    with pytest.raises(StoreDatabaseError):
        MemoryStore.open(store_path, fingerprint=synth.fingerprint())
    report = repair_store(store_path)
    assert report.database.startswith("rebuilt") and sorted(report.restored) == ["a", "b"]
    assert list(store_path.glob("memory.sqlite.damaged-*")), "the damaged file was not kept"
    _assert_intact(store_path, built[1])


# 3 ------------------------------------------------------------------------------------------


def test_3_disk_full_is_a_clear_error_from_the_cli(tmp_path, capsys, tiny_model_dir):
    """Store-level disk-full faults (mid-write, in every file kind) are in test_persistence_faults.py."""
    from test_persistence_faults import _small_file_system

    book = tmp_path / "book.txt"
    book.write_text(BOOK.read_text(encoding="utf-8"), encoding="utf-8")
    with _small_file_system(tmp_path / "small", 1) as small:
        code, _, err = cli(capsys, "read", book, "--store", small / "store", "--model", tiny_model_dir,
                           "--local-window", "64")
        assert code == 2 and "Not enough disk space" in err and "MB are free" in err, err
        assert list((small / "store" / "tmp").iterdir()) == []
# 4 ------------------------------------------------------------------------------------------


def test_4_a_store_path_that_is_a_file_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    book = tmp_path / "book.txt"
    book.write_text("Some text to read.")
    for args in (("read", book, "--store", blocker, "--model", tmp_path / "no-model"),
                 ("read", book, "--store", blocker / "sub", "--model", tmp_path / "no-model"),
                 ("docs", "--store", blocker), ("forget", "x", "--store", blocker)):
        code, _, err = cli(capsys, *args)
        assert code == 2 and "not a memory store directory" in err, err
    with pytest.raises(StorePathError):
        MemoryStore.open(blocker, fingerprint=synth.fingerprint())
    assert blocker.read_text() == "x"


# 5 and 6 -------------------------------------------------------------------------------------


def _damage(store_path: Path, name: str, file_name: str) -> str:
    return flip_bits(store_path, name, file_name)[0].id


def test_5_a_damaged_document_is_left_out_of_questions_that_do_not_name_it(text_store, tmp_path, capsys):
    store = Path(shutil.copytree(text_store, tmp_path / "store"))
    damaged = _damage(store, "two.txt", "layer1.kv")
    code, out, err = cli(capsys, "ask", QUESTION, "--store", store, "--no-chat", "--max-new-tokens", "3", "--json")
    answer = json.loads(out)
    assert code == 0 and answer["left_out"] == [{"doc": "two.txt", "doc_id": damaged,
                                                 "problem": "layer1.kv differs from its checksum"}]
    assert {source["doc"] for source in answer["sources"]} == {"one.txt"}
    assert "left out the damaged document 'two.txt'" in err
    code, _, err = cli(capsys, "ask", QUESTION, "--store", store, "--doc", "two.txt", "--no-chat")
    assert code == 2 and "'two.txt'" in err and "damaged" in err


def test_6_damaged_index_of_a_small_document_is_reported(store_path, built, capsys):
    doc_id = _damage(store_path, "a", "layer0.h1.hnsw")  # 1200 tokens: searched exactly
    code, out, _ = cli(capsys, "verify", "--store", store_path, "--json")
    report = json.loads(out)
    assert code == 1 and report["damaged"] == 1
    assert {item["name"]: item["problem"] for item in report["documents"]} == {
        "a": "layer0.h1.hnsw differs from its checksum", "b": None}
    assert cli(capsys, "verify", "--store", store_path, "--doc", "b")[0] == 0
    with MemoryStore.open(store_path, readonly=True) as store:
        good, damaged = store.usable(store.documents())  # what a question checks
        assert [r.name for r in good] == ["b"] and list(damaged) == [doc_id]
    (store_path / "docs" / doc_id / "layer1.h0.hnsw").unlink()  # a size problem shows without checksums
    code, out, _ = cli(capsys, "docs", "--store", store_path, "--json")
    listed = {item["name"]: item["damaged"] for item in json.loads(out)["documents"]}
    assert listed == {"a": "layer1.h0.hnsw is missing", "b": None}
    code, out, _ = cli(capsys, "info", "--store", store_path, "--json")
    assert json.loads(out)["damaged_documents"] == ["a"]


def test_6b_verify_and_reindex_show_progress_on_stderr_and_keep_json_clean(text_store, tmp_path, capsys):
    store = Path(shutil.copytree(text_store, tmp_path / "store"))
    code, out, err = cli(capsys, "reindex", "--store", store, "--index", "hnsw")
    assert code == 0 and "re-indexing one.txt" in err and out.count("re-indexed") == 2
    code, out, err = cli(capsys, "verify", "--store", store)
    assert code == 0 and "verifying" in err and out.endswith("2 of 2 documents ok\n")
    code, out, err = cli(capsys, "verify", "--store", store, "--json")
    assert code == 0 and json.loads(out)["damaged"] == 0 and "verifying" not in err


# 7 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [("forget", "x"), ("docs",), ("info",), ("verify",), ("reindex",),
                                     ("ask", "a question")])
def test_7_commands_that_only_read_or_remove_never_create_a_store(tmp_path, capsys, command):
    missing = tmp_path / "mistyped" / "store"
    code, _, err = cli(capsys, *command, "--store", missing)
    assert code == 2 and "No memory store at" in err
    assert not (tmp_path / "mistyped").exists()


# 8 and 9 -------------------------------------------------------------------------------------


def test_8_empty_and_invalid_names_are_refused_even_for_stored_text(text_store, tmp_path, capsys, tiny_model_dir):
    store = Path(shutil.copytree(text_store, tmp_path / "store"))
    same_text = tmp_path / "copy.txt"
    same_text.write_text(BOOK.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    for name in ("", "   ", "a/b"):
        code, _, err = cli(capsys, "read", same_text, "--store", store, "--name", name)
        assert code == 2 and "Invalid document name" in err, (name, err)
    with DocumentMemory.open(store, model=str(tiny_model_dir)) as memory:
        with pytest.raises(InvalidDocumentNameError):
            memory.read_file(same_text, name="")
        record, fresh = memory.read_file(same_text, name="copy")
        assert not fresh and record.name == "one.txt"  # the same text is not read twice


def test_9_input_name_and_lock_are_checked_before_the_model_loads(store_path, tmp_path, capsys):
    no_model = tmp_path / "no-model"  # loading it would fail: any other error came first
    empty, missing = tmp_path / "empty.txt", tmp_path / "missing.txt"
    empty.write_text("  \n")
    fine = tmp_path / "fine.txt"
    fine.write_text("A short document.")
    for path, message in ((empty, "is empty"), (missing, "is not a file")):
        code, _, err = cli(capsys, "read", path, "--store", tmp_path / "new", "--model", no_model)
        assert code == 2 and message in err and "no-model" not in err, err
    assert not (tmp_path / "new").exists()
    code, _, err = cli(capsys, "read", fine, "--name", "", "--store", store_path, "--model", no_model)
    assert code == 2 and "Invalid document name" in err
    with MemoryStore.open(store_path, hold_lock=True):
        code, _, err = cli(capsys, "read", fine, "--store", store_path, "--model", no_model)
        assert code == 2 and "Another process is writing" in err, err


# 10 -----------------------------------------------------------------------------------------


def test_10_an_answer_survives_its_document_being_forgotten_while_it_is_generated(text_store, tmp_path,
                                                                                   tiny_model_dir):
    store = Path(shutil.copytree(text_store, tmp_path / "store"))
    with DocumentMemory.open(store, model=str(tiny_model_dir), readonly=True) as memory:
        forgotten = []

        def forget_on_first_piece(piece: str) -> None:
            if not forgotten:
                with MemoryStore.open(store) as other:  # another writer, as `fot-memory forget` is
                    forgotten.append(other.forget("two.txt"))

        answer = memory.ask(QUESTION, chat=False, max_new_tokens=4, on_text=forget_on_first_piece)
        assert forgotten and answer.sources and answer.text
        with pytest.raises(KeyError, match="'two.txt'"):  # named as it was asked, not by id
            memory.ask(QUESTION, docs=["two.txt"], chat=False, max_new_tokens=2)


# 11 -----------------------------------------------------------------------------------------


def test_11_unfinished_writes_are_not_counted_and_any_writer_open_removes_only_ours(store_path):
    ours = store_path / "tmp" / "0123456789abcdef"
    ours.mkdir()
    (ours / "writer.json").write_text(json.dumps({"pid": 1}))
    (ours / "layer0.kv").write_bytes(bytes(1 << 20))
    foreign = store_path / "tmp" / "someone-elses"
    foreign.mkdir()
    with MemoryStore.open(store_path, readonly=True) as store:
        info = store.info()
        assert info["unfinished_write_bytes"] >= 1 << 20
        assert info["bytes_on_disk"] < sum(_tree(store_path).values()) - (1 << 20)
    with MemoryStore.open(store_path):  # a writer-side open with no document written
        pass
    assert not ours.exists() and foreign.exists()


# 12 -----------------------------------------------------------------------------------------


def test_12_store_files_are_owner_only_unless_shared(tmp_path):
    for shared in (False, True):
        path = tmp_path / f"store-{shared}"
        old = os.umask(0o022)
        try:
            with MemoryStore.open(path, fingerprint=synth.fingerprint(), shared=shared) as store:
                synth.write_document(store, "a", 1, 300)
        finally:
            os.umask(old)
        modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.rglob("*")]}
        leaks = {p: oct(m) for p, m in modes.items() if m & 0o077}
        if shared:
            assert leaks, "a shared store keeps the umask's permissions"
        else:
            assert not leaks, leaks


def test_12_a_symlink_is_read_and_recorded_as_given(tmp_path, tiny_model_dir):
    target = tmp_path / "real.txt"
    target.write_text(BOOK.read_text(encoding="utf-8")[:400], encoding="utf-8")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    with DocumentMemory.open(tmp_path / "store", model=str(tiny_model_dir), config=CONFIG) as memory:
        record, _ = memory.read_file(link)
    assert record.name == "link.txt" and record.source_path == str(link)
    assert record.metadata["link_target"] == str(target)


def test_a_held_writer_lock_is_shared_by_the_store_that_holds_it(store_path):
    with MemoryStore.open(store_path, fingerprint=synth.fingerprint(), hold_lock=True) as holder:
        with pytest.raises(StoreLockedError):
            MemoryStore.open(store_path, hold_lock=True, lock_timeout=0.1)
        synth.write_document(holder, "c", 3, 100)
        holder.forget("c")
    with MemoryStore.open(store_path, hold_lock=True, lock_timeout=0.1):
        pass  # released on close


def test_damaged_documents_named_by_a_question_raise(store_path):
    _damage(store_path, "a", "layer0.kv")
    with MemoryStore.open(store_path, readonly=True) as store:
        with pytest.raises(CorruptDocumentError, match="'a'"):
            store.memory(0, ["a"])


def test_5_llama_index_responses_say_which_damaged_documents_were_left_out(text_store, tmp_path):
    from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
    from fot_memory_plugin.integrations.llama_index.llm import FoTMemoryLLM

    store = Path(shutil.copytree(text_store, tmp_path / "store"))
    damaged = _damage(store, "one.txt", "layer0.kv")
    index = FoTMemoryIndex.from_persist_dir(store)
    try:
        response = index.as_query_engine(max_new_tokens=2).query(QUESTION)
        assert [item["doc_id"] for item in response.metadata["left_out"]] == [damaged]
        assert {node.node.metadata["document"] for node in response.source_nodes} == {"two.txt"}
        completion = FoTMemoryLLM(document_memory=index.memory, max_new_tokens=2).complete(QUESTION)
        assert [item["doc"] for item in completion.additional_kwargs["left_out"]] == ["one.txt"]
    finally:
        index.close()
