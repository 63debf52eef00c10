"""FoT document memory for agents: a real llama_index.core.memory.Memory with our block, a real
ReActAgent whose LLM is FoTMemoryLLM, the query engine as a QueryEngineTool, and a restart."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.agent.workflow import ReActAgent
from llama_index.core.base.response.schema import Response
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent
from llama_index.core.llms import ChatMessage
from llama_index.core.memory import InsertMethod, Memory
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.tools import QueryEngineTool

from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock, document_memory_tool
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
from llama_index_helpers import *  # noqa: F403 (fixtures)
from llama_index_helpers import QUESTION


class _Prompts(BaseEventHandler):
    prompts: list[str] = []

    @classmethod
    def class_name(cls) -> str:
        return "Prompts"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatStartEvent):
            self.prompts.append("\n".join(message.content or "" for message in event.messages))


def test_memory_block_passages_reach_the_react_agents_prompt(store_dir):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        block = FoTDocumentMemoryBlock(index=index, memory_docs=["chapter1.txt"], num_sources=2)
        assert isinstance(block, BaseMemoryBlock)
        content = asyncio.run(block.aget([ChatMessage(role="user", content=QUESTION)]))
        passages = [node.node.get_content() for node in index.as_retriever(similarity_top_k=2,
                                                                          memory_docs=["chapter1.txt"]).retrieve(QUESTION)]
        assert content.startswith("Documents in memory: chapter1.txt, persuasion.txt.")
        for passage in passages:
            assert " ".join(passage.split())[:200] in content

        memory = Memory.from_defaults(session_id="test", token_limit=4000, memory_blocks=[block],
                                      insert_method=InsertMethod.USER)
        agent = ReActAgent(tools=[document_memory_tool(index, max_new_tokens=4)],
                           llm=index.as_llm(memory_docs=[], max_new_tokens=8))
        recorder = _Prompts(prompts=[])
        dispatcher = get_dispatcher()
        dispatcher.add_event_handler(recorder)
        try:
            result = asyncio.run(_run(agent, memory))
        finally:
            dispatcher.event_handlers.remove(recorder)
    assert result.response.role == "assistant"
    assert recorder.prompts, "the agent called its LLM"
    first = recorder.prompts[0]
    assert QUESTION in first and "<document_memory>" in first
    assert " ".join(passages[0].split())[:200] in " ".join(first.split())


async def _run(agent: ReActAgent, memory: Memory) -> Any:
    return await agent.run(QUESTION, memory=memory, max_iterations=2, early_stopping_method="generate")


def test_query_engine_tool_answers_with_source_nodes(store_dir):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        tool = document_memory_tool(index, max_new_tokens=6, memory_docs=["chapter1.txt"])
        assert isinstance(tool, QueryEngineTool) and tool.metadata.name == "document_memory"
        assert "chapter1.txt" in tool.metadata.description and "persuasion.txt" in tool.metadata.description
        output = tool.call(input=QUESTION)
        expected = index.memory.ask(QUESTION, docs=["chapter1.txt"], chat=False, max_new_tokens=6)
    assert isinstance(output.raw_output, Response)
    assert output.content == expected.text
    assert [n.node.text for n in output.raw_output.source_nodes] == [s.text for s in expected.sources]


def test_document_memories_survive_a_restart(fresh_store):
    question = [ChatMessage(role="user", content=QUESTION)]
    with FoTMemoryIndex.from_persist_dir(fresh_store, readonly=True) as index:
        before = asyncio.run(FoTDocumentMemoryBlock(index=index).aget(question))
    # A new block over the same directory: a fresh store object, model and engine, as after a restart.
    block = FoTDocumentMemoryBlock(persist_dir=fresh_store, name="books")
    try:
        assert block.name == "books" and asyncio.run(block.aget(question)) == before
        assert asyncio.run(block.aget([])) == "Documents in memory: chapter1.txt, persuasion.txt."
        # Chat turns are read into a conversation (tests/test_conversation_memory.py has the details).
        asyncio.run(block.aput([ChatMessage(role="user", content="remember this")]))
        assert len(block.index.memory.documents()) == 3
        assert asyncio.run(block.aget([])).endswith("Conversations in memory: default (1 turn).")
    finally:
        block.index.close()
