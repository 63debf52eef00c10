"""llama-index Documents in a FoT store: ids and metadata in SQLite, a retriever of NodeWithScores,
a CustomQueryEngine whose source_nodes point into the documents, and reopening in a new process."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from llama_index.core.base.response.schema import Response
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeRelationship, NodeWithScore, TextNode

from fot_memory_plugin.integrations.llama_index.index import METADATA_KEY, FoTMemoryIndex
from fot_memory_plugin.persistence import StoreNotFoundError
from llama_index_helpers import *  # noqa: F403 (fixtures)
from llama_index_helpers import QUESTION, read_library


def _texts(library) -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in library.iterdir()}


def test_documents_keep_their_ids_and_metadata_in_sqlite(tmp_path, library, tiny_model_dir):
    index, documents = read_library(library, tmp_path / "store", tiny_model_dir)
    with index:
        assert sorted(index.ref_docs) == sorted(document.id_ for document in documents)
        again = index.insert_documents(documents)  # the same documents: nothing is read twice
        assert [record.id for record in again] == [index.ref_docs[d.id_].id for d in documents]
        assert len(index.memory.documents()) == 2
    with sqlite3.connect(tmp_path / "store" / "memory.sqlite") as db:  # what a new process would find
        rows = dict(db.execute("SELECT name, metadata FROM documents").fetchall())
    assert sorted(rows) == ["chapter1.txt", "persuasion.txt"]
    for document in documents:
        stored = json.loads(rows[document.metadata["file_name"]])[METADATA_KEY]
        assert stored["ref_doc_id"] == document.id_
        assert stored["metadata"]["file_name"] == document.metadata["file_name"]
        assert stored["metadata"]["file_size"] == document.metadata["file_size"]


def test_a_changed_document_replaces_its_old_version(tmp_path, library, tiny_model_dir):
    index, documents = read_library(library, tmp_path / "store", tiny_model_dir)
    with index:
        old = index.ref_docs[documents[0].id_]
        documents[0].set_content(documents[0].text + "\n\nA new closing paragraph.")
        new = index.insert(documents[0], name=old.name)
        assert new.id != old.id and index.ref_docs[documents[0].id_].id == new.id
        assert len(index.memory.documents()) == 2
        index.delete_ref_doc(documents[0].id_)
        assert documents[0].id_ not in index.ref_docs and len(index.memory.documents()) == 1
        with pytest.raises(KeyError):
            index.delete_ref_doc("no-such-id")


def test_retriever_returns_the_passages_that_draw_memory_attention(store_dir, library):
    texts = _texts(library)
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        retriever = index.as_retriever(similarity_top_k=4)
        assert isinstance(retriever, BaseRetriever)
        nodes = retriever.retrieve(QUESTION)
        expected = index.memory.find_sources(QUESTION, chat=False, num_sources=4)
        ids = {record.id: ref for ref, record in index.ref_docs.items()}
    assert len(nodes) == 4 and all(isinstance(n, NodeWithScore) and isinstance(n.node, TextNode) for n in nodes)
    assert [(n.node.start_char_idx, n.score) for n in nodes] == [(s.start_char, s.lift) for s in expected]
    scores = [n.score for n in nodes]  # lift over a question-independent probe, best first
    assert scores == sorted(scores, reverse=True)
    assert 0 < sum(n.node.metadata["attention_share"] for n in nodes) <= 1
    for found in nodes:
        node = found.node
        name = node.metadata["file_name"]
        assert texts[name][node.start_char_idx : node.end_char_idx] == node.text
        assert node.relationships[NodeRelationship.SOURCE].node_id == ids[node.metadata["doc_id"]]


@pytest.mark.parametrize("answer_mode", ["memory", "reread", "passages"])
def test_query_engine_answers_with_source_nodes_in_the_right_document(store_dir, library, answer_mode):
    texts = _texts(library)
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        engine = index.as_query_engine(memory_docs=["chapter1.txt"], max_new_tokens=6, answer_mode=answer_mode)
        assert isinstance(engine, CustomQueryEngine)
        response = engine.query(QUESTION)
        expected = index.memory.ask(QUESTION, docs=["chapter1.txt"], chat=False, max_new_tokens=6,
                                    answer_mode=answer_mode)
        by_ref_id = index.as_query_engine(memory_docs=[str(library / "chapter1.txt")], max_new_tokens=6,
                                          answer_mode=answer_mode).query(QUESTION)
    assert isinstance(response, Response) and response.response == expected.text
    assert by_ref_id.response == expected.text  # documents are chosen by name, store id or llama-index id
    # memory: the 3 passages that drew most attention; reread, passages: the passages placed (the tiny
    # model's 64-token window has room for one beside the question), then the next-ranked
    assert len(response.source_nodes) == 3
    for found in response.source_nodes:
        node = found.node
        assert node.metadata["file_name"] == "chapter1.txt"
        assert texts["chapter1.txt"][node.start_char_idx : node.end_char_idx] == node.text
    assert [n.score for n in response.source_nodes] == [s.lift for s in expected.sources]


def test_reopened_in_a_new_process_it_answers_the_same(store_dir):
    code = (  # the same torch thread count: float sums in another order can swap near-tied passages
        f"import json, sys, torch; torch.set_num_threads({torch.get_num_threads()})\n"
        "from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex\n"
        "with FoTMemoryIndex.from_persist_dir(sys.argv[1], readonly=True) as index:\n"
        "    r = index.as_query_engine(max_new_tokens=6).query(sys.argv[2])\n"
        "    print(json.dumps({'answer': r.response, 'sources': [[n.node.text, n.node.metadata['file_name'], n.score]"
        " for n in r.source_nodes], 'refs': sorted(index.ref_docs)}))\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(store_dir), QUESTION], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    reopened = json.loads(done.stdout.strip().splitlines()[-1])
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        here = index.as_query_engine(max_new_tokens=6).query(QUESTION)
        assert reopened["refs"] == sorted(index.ref_docs)
    assert reopened["answer"] == here.response
    assert reopened["sources"] == [[n.node.text, n.node.metadata["file_name"], n.score] for n in here.source_nodes]


def test_from_persist_dir_refuses_a_directory_without_a_store(tmp_path):
    with pytest.raises(StoreNotFoundError, match="No memory store"):
        FoTMemoryIndex.from_persist_dir(tmp_path / "nothing-here")
    assert not (tmp_path / "nothing-here").exists()  # and creates nothing
