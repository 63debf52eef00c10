"""FoTMemoryIndex like an index: streaming query engines, llama-index's chat engines over it,
options that are refused rather than dropped, similarity_top_k as the number of sources, and the
persist/load pair (a StorageContext refused with a sentence). Real llama-index-core objects, a
real store, a tiny random model with SmolLM2's real tokenizer."""

from __future__ import annotations

import pytest
from llama_index.core import Document, StorageContext
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.chat_engine import (
    CondensePlusContextChatEngine,
    CondenseQuestionChatEngine,
    ContextChatEngine,
    SimpleChatEngine,
)
from llama_index.core.chat_engine.types import ChatMode

from fot_memory_plugin.core.errors import QuestionTooLongError, StorageContextError, UnknownOptionError
from fot_memory_plugin.documents.long_prompts import ask_any_length
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
from llama_index_helpers import *  # noqa: F403 (fixtures)
from llama_index_helpers import CONFIG, QUESTION


@pytest.fixture
def index(store_dir):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as opened:
        yield opened


def test_streaming_query_engine_streams_the_same_answer_and_then_its_sources(index):
    expected = index.as_query_engine(max_new_tokens=6).query(QUESTION)
    streaming = index.as_query_engine(max_new_tokens=6, streaming=True).query(QUESTION)
    assert isinstance(streaming, StreamingResponse) and streaming.source_nodes == []  # ranked once generated
    pieces = list(streaming.response_gen)
    assert len(pieces) >= 2 and "".join(pieces) == expected.response
    assert [node.node.text for node in streaming.source_nodes] == [node.node.text for node in expected.source_nodes]
    assert streaming.metadata["left_out"] == []


def test_similarity_top_k_is_the_number_of_sources(index):
    assert len(index.as_query_engine(similarity_top_k=2, max_new_tokens=2).query(QUESTION).source_nodes) == 2
    assert len(index.as_query_engine(num_sources=1, max_new_tokens=2).query(QUESTION).source_nodes) == 1
    assert len(index.as_retriever(similarity_top_k=4).retrieve(QUESTION)) == 4
    with pytest.raises(ValueError, match="disagree"):
        index.as_query_engine(similarity_top_k=2, num_sources=3)


def test_unknown_options_are_refused_naming_the_accepted_ones(index):
    with pytest.raises(UnknownOptionError, match="'similarity_topk'.*similarity_top_k") as refused:
        index.as_query_engine(similarity_topk=2)
    assert isinstance(refused.value, TypeError) and "streaming" in refused.value.accepted
    with pytest.raises(UnknownOptionError, match="response_mode.*answer_mode='memory', 'passages' or 'reread'"):
        index.as_query_engine(response_mode="compact")
    with pytest.raises(UnknownOptionError, match="as_retriever does not take 'streaming'"):
        index.as_retriever(streaming=True)
    with pytest.raises(UnknownOptionError, match="condense_question.*'context_template'"):
        index.as_chat_engine(chat_mode="condense_question", context_template="{context_str}")
    with pytest.raises(ValueError, match="chat_mode 'react' is not one of best, condense_question, context"):
        index.as_chat_engine(chat_mode="react")


@pytest.mark.parametrize(("chat_mode", "engine_class"), [
    ("best", CondenseQuestionChatEngine),
    (ChatMode.CONDENSE_QUESTION, CondenseQuestionChatEngine),
    ("context", ContextChatEngine),
    ("condense_plus_context", CondensePlusContextChatEngine),
    ("simple", SimpleChatEngine),
])
def test_as_chat_engine_gives_llama_indexs_chat_engines(index, chat_mode, engine_class):
    if engine_class is CondenseQuestionChatEngine:  # query engine options go to the FoT query engine
        engine = index.as_chat_engine(chat_mode=chat_mode, max_new_tokens=4)
    else:  # llama-index pads packed prompts by 500 tokens: more than the tiny model's 512 positions
        engine = index.as_chat_engine(chat_mode=chat_mode, llm=index.as_llm(context_window=2048, max_new_tokens=4))
    assert isinstance(engine, engine_class)
    first = engine.chat(QUESTION)
    second = engine.stream_chat("And who is his friend?")
    streamed = "".join(second.response_gen)
    assert isinstance(first.response, str) and streamed == second.response
    assert len(engine.chat_history) == 4
    if engine_class is not SimpleChatEngine:  # the passages memory attention found are the sources
        assert first.source_nodes and all(node.node.metadata["document"] for node in first.source_nodes)


def test_a_storage_context_is_refused_and_the_persist_pair_is_named(tmp_path, index):
    target = tmp_path / "store"
    with pytest.raises(StorageContextError, match="persist_dir=DIR.*FoTMemoryIndex.from_persist_dir"):
        FoTMemoryIndex.from_documents([Document(text="Some text.")], target, storage_context=StorageContext.from_defaults())
    assert not target.exists()  # refused before anything was made
    with pytest.raises(AttributeError, match="no StorageContext.*from_persist_dir"):
        index.storage_context.persist(persist_dir=str(tmp_path / "elsewhere"))
    index.persist(index.persist_dir)  # the store is the persist directory: nothing to do


def test_long_documents_read_with_a_progress_bar_by_default(tmp_path, tiny_model_dir, capsys):
    short, long = Document(text="A short note. " * 10, id_="short"), Document(text="Words go on. " * 700, id_="long")
    assert len(long.text) > 4 * 8 * CONFIG.local_window > len(short.text)
    with FoTMemoryIndex.from_documents([short], tmp_path / "a", model=str(tiny_model_dir), config=CONFIG):
        assert "reading" not in capsys.readouterr().err
    with FoTMemoryIndex.from_documents([long], tmp_path / "b", model=str(tiny_model_dir), config=CONFIG):
        assert "reading" in capsys.readouterr().err
    with FoTMemoryIndex.from_documents([long], tmp_path / "c", model=str(tiny_model_dir), config=CONFIG,
                                       show_progress=False):
        assert "reading" not in capsys.readouterr().err


def test_a_question_longer_than_the_local_window_is_answered(index, library):
    question = (library / "chapter1.txt").read_text(encoding="utf-8")[:1200] + "\n" + QUESTION
    assert len(index.memory.engine.encode(question)[0]) > 3 * CONFIG.local_window
    for chat in (False, True):  # with the chat template too: the templated prompt's head goes to memory
        response = index.as_query_engine(max_new_tokens=4, chat=chat).query(question)
        assert isinstance(response, Response) and len(response.source_nodes) == 3
    with pytest.raises(QuestionTooLongError):  # DocumentMemory.ask itself still refuses it
        index.memory.ask(question, chat=False)
    assert ask_any_length(index.memory, question, docs=None, chat=False, answer_mode="reread", ranking="attention",
                          max_new_tokens=4).text == index.as_query_engine(
        max_new_tokens=4, answer_mode="reread", ranking="attention").query(question).response
    assert index.memory.engine.router.extra is None  # nothing of the question stays in memory
