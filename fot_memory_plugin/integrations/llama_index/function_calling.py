"""Why FoTMemoryLLM does not call functions, said where a user meets it.

llama-index's `FunctionAgent` (and `AgentWorkflow` built on it) and the tool-calling methods
of a `FunctionCallingLLM` (`chat_with_tools`, `astream_chat_with_tools`, ...) need a model
trained to emit tool calls in a structured format, behind an integration that parses them.
The default model (SmolLM2-135M-Instruct) was not trained for that, so FoTMemoryLLM reports
`is_function_calling_model=False` and refuses those uses with `FunctionCallingUnsupportedError`,
whose sentence says what works instead. `ReActAgent` (tools described in plain text) runs with
it; any function-calling LLM can drive a FunctionAgent whose `Memory` holds
`FoTDocumentMemoryBlock`, so the agent still gets FoT memory.

FunctionAgent checks `llm.metadata.is_function_calling_model` itself and raises a bare
"LLM must be a FunctionCallingLLM"; `refuse_function_agent` (called by FoTMemoryLLM's
`metadata`) recognises that one caller by its code object and raises our sentence first. With
a llama-index whose FunctionAgent checks elsewhere it does nothing, and llama-index's own
error stands (tests/test_function_calling.py notices).
"""

from __future__ import annotations

import sys
from typing import Any

from ...core.errors import FunctionCallingUnsupportedError

__all__ = ["RefusesFunctionCalling", "refuse_function_agent", "function_calling_refusal"]


def function_calling_refusal(model_name: str, use: str) -> str:
    """The sentence a refused use gets: what cannot work, why, and what to use instead."""
    return (
        f"{use} needs an LLM that calls functions, and FoTMemoryLLM cannot: its model ({model_name}; by default "
        "SmolLM2-135M-Instruct) was not trained to emit tool calls. Use ReActAgent with it (tools described in "
        "text), or give FunctionAgent a function-calling LLM, a model trained for tool calls behind an "
        "integration that supports them (for example OpenAI, Anthropic, or Ollama / HuggingFaceLLM with "
        "Qwen2.5-Instruct or Llama-3.1-Instruct), and put FoTDocumentMemoryBlock in its Memory for FoT memory."
    )


def refuse_function_agent(llm: Any) -> None:
    """Raise FunctionCallingUnsupportedError when the caller of `llm.metadata` is FunctionAgent's step."""
    try:
        from llama_index.core.agent.workflow import FunctionAgent
    except ImportError:  # a llama-index without it: nothing to recognise
        return
    step = getattr(FunctionAgent.take_step, "__code__", None)
    frame = sys._getframe(1)
    for _ in range(3):  # the metadata property, then its caller (a wrapper or two at most)
        frame = frame.f_back
        if frame is None:
            return
        if frame.f_code is step:
            raise FunctionCallingUnsupportedError(function_calling_refusal(getattr(llm, "model_name", "?"),
                                                                           "FunctionAgent"))


class RefusesFunctionCalling:
    """The tool-calling methods of llama-index's FunctionCallingLLM, each refusing with the sentence."""

    def _refuse(self, use: str) -> FunctionCallingUnsupportedError:
        return FunctionCallingUnsupportedError(function_calling_refusal(getattr(self, "model_name", "?"), use))

    def chat_with_tools(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("chat_with_tools")

    async def achat_with_tools(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("achat_with_tools")

    def stream_chat_with_tools(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("stream_chat_with_tools")

    async def astream_chat_with_tools(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("astream_chat_with_tools")

    def get_tool_calls_from_response(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("get_tool_calls_from_response")
