"""Persistent document memories end to end: real hnswlib and SQLite files, a tiny random model
with SmolLM2's real tokenizer, and fresh processes for everything that must survive a restart."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.core.errors import (
    DocumentInputError,
    DocumentNotFoundError,
    IncompatibleStoreError,
    NoDocumentsError,
)

CONFIG = MemoryConfig(local_window=64, top_k=8, mem_dtype="float16", retrieval="exact")


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("docs") / "chapter1.txt"
    path.write_text(BOOK.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    return path


@pytest.fixture
def store_dir(tmp_path, tiny_model_dir, document) -> Path:
    with DocumentMemory.open(tmp_path / "store", model=str(tiny_model_dir), config=CONFIG) as memory:
        record, fresh = memory.read_file(document)
        assert fresh and record.num_tokens > 4 * CONFIG.local_window
    return tmp_path / "store"


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fot_memory_plugin.apps.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_answers_from_disk_in_a_new_process_equal_the_in_ram_exact_memory(store_dir, tiny_model_dir, document):
    answer = json.loads(_cli("ask", QUESTION, "--store", str(store_dir), "--no-chat", "--answer-mode", "memory",
                             "--max-new-tokens", "8", "--json").stdout)
    from fot_memory_plugin.models.loading import load_model

    loaded = load_model(str(tiny_model_dir))
    with MemoryEngine(loaded.model, loaded.tokenizer, CONFIG) as engine:
        engine.read(document.read_text(encoding="utf-8"))
        expected = engine.answer(QUESTION, chat=False, max_new_tokens=8)
    assert answer["answer"] == expected
    scanned = json.loads(_cli("ask", QUESTION, "--store", str(store_dir), "--no-chat", "--max-new-tokens", "8",
                              "--answer-mode", "memory", "--exact", "--json").stdout)
    assert scanned["answer"] == expected
    text = document.read_text(encoding="utf-8")
    assert answer["sources"], "an answer from memory cites the passages it attended to"
    for source in answer["sources"]:
        assert source["doc"] == "chapter1.txt" and 0 < source["weight"] <= 1
        assert text[source["start_char"] : source["end_char"]] == source["text"]


def test_stored_retrieval_equals_in_ram_retrieval(store_dir, tiny_model_dir, document):
    with DocumentMemory.open(store_dir, readonly=True) as memory:
        engine = memory.engine
        engine.read(document.read_text(encoding="utf-8"))  # the in-RAM reference, same model and config
        queries = torch.randn(1, 4, 5, 8, generator=torch.Generator().manual_seed(0))
        for layer in engine.layers:
            in_ram = _sorted_by_id(engine.memories[layer].search(queries, 8))
            stored = _sorted_by_id(memory.store.memory(layer, exact=True).search(queries, 8))
            # Same hits (the order within the top-k does not matter to the softmax), same vectors.
            assert torch.equal(stored[0], in_ram[0])
            torch.testing.assert_close(stored[1], in_ram[1])
            torch.testing.assert_close(stored[2], in_ram[2])


def test_reading_without_retrieval_stores_what_the_engine_reads_without_retrieval(tmp_path, tiny_model_dir, document):
    text = document.read_text(encoding="utf-8")
    queries = torch.randn(1, 4, 5, 8, generator=torch.Generator().manual_seed(0))
    with DocumentMemory.open(tmp_path / "store", model=str(tiny_model_dir), config=CONFIG) as memory:
        memory.read_text(text, name="fast", retrieve=False)
        engine = memory.engine
        engine.read(text, retrieve=False)
        without = {layer: engine.memories[layer].keys.clone() for layer in engine.layers}
        for layer in engine.layers:
            stored = _sorted_by_id(memory.store.memory(layer, exact=True).search(queries, 8))
            in_ram = _sorted_by_id(engine.memories[layer].search(queries, 8))
            assert torch.equal(stored[0], in_ram[0])
            torch.testing.assert_close(stored[1], in_ram[1])
        engine.reset()
        engine.read(text)  # with retrieval: every layer after the first sees memory, so its keys change
        changed = [not torch.equal(engine.memories[layer].keys, without[layer]) for layer in engine.layers]
    assert changed[0] is False and all(changed[1:])


def _sorted_by_id(hits):
    ids, order = hits.token_ids.sort(dim=-1)
    index = order.unsqueeze(-1).expand_as(hits.keys)
    return ids, hits.keys.gather(-2, index), hits.values.gather(-2, index)


def test_reading_the_same_text_again_is_a_no_op_unless_forced(store_dir, document):
    with DocumentMemory.open(store_dir) as memory:
        first = memory.documents()[0]
        record, fresh = memory.read_file(document)
        assert not fresh and record.id == first.id
        record, fresh = memory.read_file(document, force=True)
        assert fresh and [doc.name for doc in memory.documents()] == ["chapter1.txt"]


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"   \n\t ", "empty"), (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"), (b"caf\xe9 au lait", "UTF-8")],
)
def test_bad_input_is_refused_and_nothing_stored_changes(store_dir, tmp_path, content, message):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with DocumentMemory.open(store_dir) as memory:
        before = memory.documents()
        with pytest.raises(DocumentInputError, match=message):
            memory.read_file(bad)
        assert memory.documents() == before


def test_a_store_refuses_another_memory_config(store_dir, tiny_model_dir):
    with pytest.raises(IncompatibleStoreError, match="local_window"):
        DocumentMemory.open(store_dir, model=str(tiny_model_dir), config=CONFIG.replace(local_window=128))
    with DocumentMemory.open(store_dir, readonly=True) as memory:  # still intact
        assert len(memory.documents()) == 1


def test_unknown_documents_and_empty_stores_say_what_to_do(store_dir):
    with DocumentMemory.open(store_dir) as memory:
        with pytest.raises(DocumentNotFoundError):
            memory.ask(QUESTION, docs=["no-such-document"])
        memory.forget("chapter1.txt")
        with pytest.raises(NoDocumentsError, match="read one first"):
            memory.ask(QUESTION)


def test_cli_lists_describes_and_forgets(store_dir):
    docs = json.loads(_cli("docs", "--store", str(store_dir), "--json").stdout)["documents"]
    assert [doc["name"] for doc in docs] == ["chapter1.txt"]
    info = json.loads(_cli("info", "--store", str(store_dir), "--json").stdout)
    assert info["documents"] == 1 and info["fingerprint"]["memory_config"]["local_window"] == 64
    missing = _cli("ask", "anything", "--store", str(store_dir), "--doc", "nope")
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    reindexed = json.loads(_cli("reindex", "--store", str(store_dir), "--json").stdout)["documents"]
    assert [(doc["name"], doc["replaced_id"]) for doc in reindexed] == [("chapter1.txt", docs[0]["id"])]
    docs = json.loads(_cli("docs", "--store", str(store_dir), "--json").stdout)["documents"]
    assert [doc["id"] for doc in docs] == [reindexed[0]["id"]]
    assert _cli("forget", docs[0]["id"], "--store", str(store_dir)).returncode == 0
    assert json.loads(_cli("docs", "--store", str(store_dir), "--json").stdout)["documents"] == []


def _kept(store_dir: Path, sql: str = "SELECT count(*) FROM derived") -> int:
    """Run SQL on the store's database as another process would (returns the first value)."""
    with sqlite3.connect(store_dir / "memory.sqlite") as db:
        row = db.execute(sql).fetchone()
    return row[0] if row else 0


def test_a_read_keeps_the_baseline_so_a_read_only_process_answers_the_same_without_the_probe(store_dir):
    """read_text keeps the baseline probe's chunk shares (chat and completion form) in the store;
    a read-only process answers without running the probe, as it answers computing them; a kept
    value failing its CRC is recomputed; adding or forgetting a document drops what was kept."""
    question = "Mr. Bennet replied that"

    def ask(memory):
        answer = memory.ask(question, chat=False, max_new_tokens=6)
        return answer.text, [(source.start_char, source.end_char, source.weight) for source in answer.sources]

    with DocumentMemory.open(store_dir) as memory:  # the store's recorded config, as `fot-memory read` opens it
        memory.read_text(BOOK.read_text(encoding="utf-8")[1500:3000], name="chapter1, later")
    assert _kept(store_dir) == 2
    passes = []
    with DocumentMemory.open(store_dir, readonly=True) as memory:
        attending = memory._attending
        memory._attending = lambda *args, **kwargs: (passes.append(args), attending(*args, **kwargs))[1]
        kept = ask(memory)
    assert len(passes) == 1, "only the question's pass: the baseline came from the store"
    _kept(store_dir, "UPDATE derived SET value = CAST('damaged' AS BLOB)")
    with DocumentMemory.open(store_dir) as memory:
        assert ask(memory) == kept  # computed again, and kept again
    assert _kept(store_dir, "SELECT count(*) FROM derived WHERE value != CAST('damaged' AS BLOB)") == 1
    with DocumentMemory.open(store_dir) as memory:
        memory.forget("chapter1.txt")
    assert _kept(store_dir) == 0
