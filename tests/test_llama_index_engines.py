"""FoTMemoryLLM as `Settings.llm` inside llama-index's own engines: VectorStoreIndex query and
chat engines, SummaryIndex, ReActAgent. Real llama-index-core objects throughout (MockEmbedding
is llama-index's own offline embedding), a real store, a tiny random model with SmolLM2's real
tokenizer: local window 64 tokens, 512 trained positions. llama-index keeps 500 tokens of padding
when it packs prompts, so the LLM here advertises context_window=2048: beyond the trained
positions its prompts' heads are read into memory, which makes that true."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from llama_index.core import Settings, SimpleDirectoryReader, SummaryIndex, VectorStoreIndex
from llama_index.core.agent.workflow import ReActAgent
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool

from fot_memory_plugin.integrations.llama_index.llm import FoTMemoryLLM
from fot_memory_plugin.integrations.llama_index.streaming import StrippedDeltas
from llama_index_helpers import *  # noqa: F403 (fixtures)
from llama_index_helpers import CONFIG, QUESTION


@pytest.fixture
def llm(store_dir):
    model = FoTMemoryLLM(store_dir, max_new_tokens=4, readonly=True, context_window=2048)
    yield model
    model.close()


@pytest.fixture
def settings(llm):
    """Settings.llm = the FoT LLM (and llama-index's offline MockEmbedding), restored afterwards."""
    previous = Settings._llm, Settings._embed_model
    Settings.llm = llm
    Settings.embed_model = MockEmbedding(embed_dim=16)
    yield llm
    Settings._llm, Settings._embed_model = previous


@pytest.fixture
def documents(library):
    return SimpleDirectoryReader(input_dir=str(library), filename_as_id=True).load_data()


class _Prompts(BaseEventHandler):
    """Every prompt and chat the LLM receives, through llama-index's instrumentation."""

    seen: list[Any] = []

    @classmethod
    def class_name(cls) -> str:
        return "Prompts"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMCompletionStartEvent):
            self.seen.append(event.prompt)
        elif isinstance(event, LLMChatStartEvent):
            self.seen.append(event.messages)


@pytest.fixture
def prompts():
    handler = _Prompts(seen=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(handler)
    yield handler.seen
    dispatcher.event_handlers.remove(handler)


def _tokens(llm: FoTMemoryLLM, text: str) -> int:
    return len(llm.tokenizer(text, add_special_tokens=False).input_ids)


def test_vector_store_index_query_engine_answers_and_streams(settings, documents, prompts):
    index = VectorStoreIndex.from_documents(documents)
    response = index.as_query_engine(similarity_top_k=2).query(QUESTION)
    assert isinstance(response, Response) and len(response.source_nodes) == 2
    # llama-index packed the retrieved chunks into one prompt far longer than the local window.
    assert max(_tokens(settings, prompt) for prompt in prompts) > 3 * CONFIG.local_window
    streaming = index.as_query_engine(similarity_top_k=2, streaming=True).query(QUESTION)
    assert isinstance(streaming, StreamingResponse)
    assert "".join(streaming.response_gen) == response.response


@pytest.mark.parametrize("chat_mode", ["best", "condense_question", "context", "condense_plus_context", "simple"])
def test_vector_store_index_chat_engines(settings, documents, chat_mode):
    engine = VectorStoreIndex.from_documents(documents).as_chat_engine(chat_mode=chat_mode)
    first = engine.chat(QUESTION)
    second = engine.chat("And who is his friend?")  # the history is now part of the prompt
    assert isinstance(first.response, str) and isinstance(second.response, str)
    assert len(engine.chat_history) == 4


@pytest.mark.parametrize("response_mode", ["compact", "tree_summarize", "refine"])
def test_summary_index_query_engine(settings, documents, prompts, response_mode):
    response = SummaryIndex.from_documents(documents).as_query_engine(response_mode=response_mode).query(QUESTION)
    assert isinstance(response.response, str) and len(response.source_nodes) >= 2
    assert all(_tokens(settings, prompt) <= settings.context_window for prompt in prompts if isinstance(prompt, str))


def test_react_agent_builds_its_prompt_and_gets_an_answer(settings, prompts):
    """The ReAct prompt (tool descriptions, format instructions) is ~10x the local window; the LLM
    takes it whole, the FoT way. (Whether a 135M model follows ReAct is another matter.)"""

    def passkey() -> str:
        """Return the pass key."""
        return "71432"

    agent = ReActAgent(tools=[FunctionTool.from_defaults(passkey)], llm=settings, early_stopping_method="generate")

    async def run() -> Any:
        return await agent.run("What is the pass key?", max_iterations=1)

    result = asyncio.run(run())
    assert isinstance(str(result), str)
    chats = [seen for seen in prompts if isinstance(seen, list)]
    assert chats and "passkey" in chats[0][0].content and "Thought" in chats[0][0].content
    assert _tokens(settings, settings.messages_to_prompt(chats[0])) > 4 * CONFIG.local_window


def test_a_prompt_as_long_as_context_window_is_taken_from_memory_and_plain(settings, library):
    """context_window is true: a prompt filling it (less the answer) is answered, with documents (its
    head read into memory beside them) and without (the plain model reads the head beyond its 512
    positions into memory too), and streaming gives the same text."""
    text = (library / "chapter1.txt").read_text(encoding="utf-8") * 6
    ids = settings.tokenizer(text, add_special_tokens=False).input_ids
    room = settings.context_window - settings.max_new_tokens
    prompt = settings.tokenizer.decode(ids[:room])
    assert _tokens(settings, prompt) >= room - 2
    for memory_docs in (None, []):
        response = settings.complete(prompt, memory_docs=memory_docs)
        assert response.text and bool(response.additional_kwargs["sources"]) == (memory_docs is None)
        assert list(settings.stream_complete(prompt, memory_docs=memory_docs))[-1].text == response.text
    assert settings.memory.engine.router.extra is None and settings.memory.engine.memory_tokens == 0


def test_the_plain_model_keeps_a_prompt_within_its_positions_whole(settings, library):
    """Without documents, a prompt that fits the trained positions is the plain model's, unchanged."""
    text = (library / "chapter1.txt").read_text(encoding="utf-8")
    assert 3 * CONFIG.local_window < _tokens(settings, text) < 512 - settings.max_new_tokens
    engine = settings.memory.engine
    expected = engine.generate(engine.encode(text), max_new_tokens=4, plain=True)[0]
    assert settings.complete(text, memory_docs=[]).text == settings.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_system_prompt_query_wrapper_and_stopping_ids(store_dir):
    llm = FoTMemoryLLM(store_dir, memory_docs=[], max_new_tokens=6, readonly=True, system_prompt="Be brief.",
                       query_wrapper_prompt="Q: {query_str}\nA:")
    try:
        wrapped = "Q: Be brief.\n\n" + QUESTION + "\nA:"
        assert llm.complete(QUESTION).text == llm.complete(wrapped, formatted=True).text
        chat = llm.messages_to_prompt([ChatMessage(role="user", content="Who came?")])
        assert "Be brief." in chat and chat.index("Be brief.") < chat.index("Who came?")
        free = llm.memory.engine.generate(llm.memory.engine.encode(wrapped), max_new_tokens=6, plain=True)[0]
        stop = int(free[1])  # the second token generated
        stopped = FoTMemoryLLM(document_memory=llm.memory, memory_docs=[], max_new_tokens=6, stopping_ids=[stop])
        expected = llm.tokenizer.decode(free[:2], skip_special_tokens=True).strip()
        assert stopped.complete(wrapped, formatted=True).text == expected
    finally:
        llm.close()


def test_streamed_deltas_add_up_to_the_stripped_text():
    pieces = ["\n", " \n The", " young", " ", "\n", "man", "\n\n", " "]
    trimmed = StrippedDeltas()
    deltas = [trimmed.feed(piece) for piece in pieces]
    assert "".join(deltas) == "".join(pieces).strip() == "The young \nman"
    assert deltas[0] == "" and deltas[4] == ""  # whitespace is held back until text follows it
