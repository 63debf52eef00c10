"""Persistent document memory for llama-index agents: a memory block and a query-engine tool.

`FoTDocumentMemoryBlock` is a `BaseMemoryBlock` for `llama_index.core.memory.Memory`: on every
turn it lets the latest user message draw FoT memory attention over the named documents of a
store and puts the passages that drew the most into the agent's system message. The store is
a directory, so the memories survive restarts: a new process reopens it with
`FoTMemoryIndex.from_persist_dir` (or the block's `persist_dir`). `document_memory_tool` exposes
the FoT query engine as a `QueryEngineTool` for agents that call tools (a ReActAgent; a
CustomLLM is not function-calling).

    >>> index = FoTMemoryIndex.from_persist_dir("store")                      # doctest: +SKIP
    >>> memory = Memory.from_defaults(memory_blocks=[FoTDocumentMemoryBlock(index=index)])
    >>> agent = ReActAgent(tools=[document_memory_tool(index)], llm=index.as_llm(memory_docs=[]))
    >>> await agent.run("Who took Netherfield Park?", memory=memory)
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, List, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.tools import QueryEngineTool

from ...core.config import DEFAULT_RANKING, Ranking
from .index import FoTMemoryIndex

__all__ = ["FoTDocumentMemoryBlock", "document_memory_tool"]


class FoTDocumentMemoryBlock(BaseMemoryBlock[str]):
    """Passages of stored documents that the latest user message draws FoT memory attention to."""

    name: str = Field(default="document_memory", description="The block's name (its tag in the prompt).")
    description: Optional[str] = Field(
        default="Passages of documents read into FoT memory that the latest message attends to.",
        description="What the block holds.",
    )
    memory_docs: Optional[List[str]] = Field(
        default=None, description="Documents (names, store ids or llama-index ids) to attend to; None: all."
    )
    num_sources: int = Field(default=2, ge=1, description="Passages put into the prompt per turn.")
    max_chars: int = Field(default=600, gt=0, description="Characters kept of each passage.")
    ranking: Ranking = Field(
        default=DEFAULT_RANKING, description="Passage ranking: 'lift' (attention beyond a question-independent "
        "probe) or 'attention'. The block itself is re-read answering: its passages enter the agent's prompt.",
    )
    accept_short_term_memory: bool = Field(
        default=False, description="Chat messages are not read into document memory; read documents explicitly.",
    )
    _index: FoTMemoryIndex = PrivateAttr()

    def __init__(self, *, index: FoTMemoryIndex | None = None, persist_dir: str | os.PathLike[str] | None = None,
                 **fields: Any) -> None:
        """Attend over an open `index`, or reopen the store at `persist_dir`."""
        if (index is None) == (persist_dir is None):
            raise ValueError("Give exactly one of index= (an open FoTMemoryIndex) or persist_dir= (a store directory).")
        super().__init__(**fields)
        self._index = index if index is not None else FoTMemoryIndex.from_persist_dir(persist_dir)

    @property
    def index(self) -> FoTMemoryIndex:
        return self._index

    async def _aget(self, messages: Optional[List[ChatMessage]] = None, **block_kwargs: Any) -> str:
        records = self._index.memory.documents()
        names = ", ".join(record.name for record in records) or "none"
        question = _latest_user_text(messages or [])
        if not records or not question:
            return f"Documents in memory: {names}."
        nodes = await asyncio.to_thread(self._passages, question)
        lines = [f"Documents in memory: {names}. Passages the question attends to:"]
        for found in nodes:
            node = found.node
            passage = " ".join(node.get_content().split())[: self.max_chars]
            lines.append(f'[{node.metadata["document"]}, characters {node.start_char_idx}-{node.end_char_idx}] {passage}')
        return "\n".join(lines)

    def _passages(self, question: str) -> list:
        retriever = self._index.as_retriever(similarity_top_k=self.num_sources, memory_docs=self.memory_docs,
                                             ranking=self.ranking)
        return retriever.retrieve(question)

    async def _aput(self, messages: List[ChatMessage]) -> None:
        """Nothing to do: documents enter memory by reading them, not from the chat."""


def document_memory_tool(
    index: FoTMemoryIndex,
    *,
    name: str = "document_memory",
    description: str | None = None,
    **engine_fields: Any,
) -> QueryEngineTool:
    """The index's FoT query engine as an agent tool (fields: memory_docs, chat, max_new_tokens, num_sources)."""
    names = ", ".join(record.name for record in index.memory.documents()) or "no documents yet"
    description = description or (
        f"Answers a question from FoT memory of these documents: {names}. Input: the question, "
        "best phrased as the start of a sentence that the answer completes."
    )
    return QueryEngineTool.from_defaults(query_engine=index.as_query_engine(**engine_fields), name=name,
                                         description=description)


def _latest_user_text(messages: List[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == MessageRole.USER and (message.content or "").strip():
            return message.content.strip()
    return ""
