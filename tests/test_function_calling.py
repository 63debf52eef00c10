"""FunctionAgent and the tool-calling methods refuse FoTMemoryLLM with a sentence that says why and
what works; a FunctionAgent driven by a function-calling LLM still gets FoT memory through the
memory block and the query-engine tool. The function-calling LLM is llama-index's own
MockFunctionCallingLLM (it calls every tool it is given), the rest is ours and real."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core.agent.workflow import FunctionAgent, ReActAgent
from llama_index.core.llms import ChatMessage
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index.core.memory import Memory

from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock, document_memory_tool
from fot_memory_plugin.core.errors import FunctionCallingUnsupportedError
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
from llama_index_helpers import *  # noqa: F403 (fixtures)
from llama_index_helpers import QUESTION

SENTENCE = "FunctionAgent needs an LLM that calls functions, and FoTMemoryLLM cannot"


def test_function_agent_refuses_fot_llm_with_a_sentence(store_dir):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        llm = index.as_llm(memory_docs=[])
        assert llm.metadata.is_function_calling_model is False  # any other caller reads it as usual
        agent = FunctionAgent(tools=[document_memory_tool(index)], llm=llm)
        with pytest.raises(FunctionCallingUnsupportedError) as refused:
            asyncio.run(_run(agent, QUESTION))
    message = str(refused.value)
    assert message.startswith(SENTENCE)
    assert "was not trained to emit tool calls" in message and "Use ReActAgent" in message
    assert "a model trained for tool calls" in message and "FoTDocumentMemoryBlock" in message


@pytest.mark.parametrize("method", ["chat_with_tools", "stream_chat_with_tools", "get_tool_calls_from_response"])
def test_tool_calling_methods_refuse(store_dir, method):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        llm = index.as_llm(memory_docs=[])
        with pytest.raises(FunctionCallingUnsupportedError, match=f"^{method} needs an LLM that calls functions"):
            getattr(llm, method)([document_memory_tool(index)], chat_history=[ChatMessage(role="user", content="hi")])
        with pytest.raises(FunctionCallingUnsupportedError, match="^achat_with_tools needs"):
            asyncio.run(llm.achat_with_tools([document_memory_tool(index)]))


def test_react_agent_accepts_fot_llm(store_dir):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        ReActAgent(tools=[document_memory_tool(index)], llm=index.as_llm(memory_docs=[]))  # no refusal


def test_a_function_calling_llm_drives_fot_memory_through_the_block_and_the_tool(store_dir):
    with FoTMemoryIndex.from_persist_dir(store_dir, readonly=True) as index:
        block = FoTDocumentMemoryBlock(index=index, memory_docs=["chapter1.txt"], num_sources=1,
                                       accept_short_term_memory=False)
        memory = Memory.from_defaults(session_id="fc", token_limit=4000, memory_blocks=[block])
        tool = document_memory_tool(index, max_new_tokens=4, memory_docs=["chapter1.txt"])
        agent = FunctionAgent(tools=[tool], llm=MockFunctionCallingLLM(), streaming=False)
        result = asyncio.run(_run(agent, QUESTION, memory=memory, max_iterations=3))
        prompt = asyncio.run(memory.aget(input=QUESTION))
    calls = [call for call in result.tool_calls if call.tool_name == "document_memory"]
    assert calls, "the function-calling LLM called the FoT memory tool"
    response = calls[0].tool_output.raw_output  # the FoT query engine's answer, with its sources
    assert response.source_nodes and response.source_nodes[0].node.metadata["document"] == "chapter1.txt"
    assert "<document_memory>" in "\n".join(message.content or "" for message in prompt)


async def _run(agent, question, **options):
    return await agent.run(question, **options)
