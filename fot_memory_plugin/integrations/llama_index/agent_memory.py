"""Persistent document memory for llama-index agents: a memory block and a query-engine tool.

`FoTDocumentMemoryBlock` is a `BaseMemoryBlock` for `llama_index.core.memory.Memory`: on every
turn it lets the latest user message draw FoT memory attention over the named documents of a
store and puts the passages that drew the most into the agent's prompt. The chat turns that
`Memory` flushes out of its short-term queue come to the block's `aput`, which reads them into
a conversation of the store (conversations.py: one part per flush, reading only the new turns,
the chat id and roles in the part's metadata), so a later session, in any process, recalls
what was said through memory attention, with the turn cited. The store is a directory, so the
memories survive restarts: a new process reopens it with `FoTMemoryIndex.from_persist_dir` (or
the block's `persist_dir`). `document_memory_tool` exposes the FoT query engine as a
`QueryEngineTool` for agents that call tools (a ReActAgent; a CustomLLM is not
function-calling).

    >>> index = FoTMemoryIndex.from_persist_dir("store")                      # doctest: +SKIP
    >>> memory = Memory.from_defaults(memory_blocks=[FoTDocumentMemoryBlock(index=index)])
    >>> agent = ReActAgent(tools=[document_memory_tool(index)], llm=index.as_llm(memory_docs=[]))
    >>> await agent.run("Who took Netherfield Park?", memory=memory)
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any, List, Optional

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.memory.memory import BaseMemoryBlock
from llama_index.core.tools import QueryEngineTool

from ...core.config import DEFAULT_RANKING, Ranking
from ...documents.conversations import AppendResult, append_turns, conversations, turn_at
from .index import FoTMemoryIndex

__all__ = ["FoTDocumentMemoryBlock", "document_memory_tool"]

logger = logging.getLogger(__name__)


class FoTDocumentMemoryBlock(BaseMemoryBlock[str]):
    """Passages of stored documents that the latest user message draws FoT memory attention to."""

    name: str = Field(default="document_memory", description="The block's name (its tag in the prompt).")
    description: Optional[str] = Field(
        default="Passages of documents read into FoT memory that the latest message attends to.",
        description="What the block holds.",
    )
    memory_docs: Optional[List[str]] = Field(
        default=None, description="Documents (names, store ids or llama-index ids) to attend to; None: all. "
        "With include_conversations, [] attends to the conversations only.",
    )
    num_sources: int = Field(default=2, ge=1, description="Passages put into the prompt per turn.")
    max_chars: int = Field(default=600, gt=0, description="Characters kept of each passage.")
    ranking: Ranking = Field(
        default=DEFAULT_RANKING, description="Passage ranking: 'lift' (attention beyond a question-independent "
        "probe) or 'attention'. The block itself is re-read answering: its passages enter the agent's prompt.",
    )
    accept_short_term_memory: bool = Field(
        default=True, description="Read the chat turns Memory flushes out of its short-term queue into a "
        "conversation of the store (recalled by later sessions); False drops them.",
    )
    include_conversations: bool = Field(
        default=True, description="Attend to the store's conversations too when memory_docs names documents.",
    )
    chat_id: Optional[str] = Field(
        default=None, description="The conversation that turns without a session_id are read into (Memory "
        "gives its session_id to the turns it flushes); None: 'default'.",
    )
    _index: FoTMemoryIndex = PrivateAttr()
    _engine_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _appended: List[AppendResult] = PrivateAttr(default_factory=list)

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

    @property
    def appended(self) -> List[AppendResult]:
        """What this block's aput calls stored (one conversation part each), oldest first."""
        return self._appended

    async def _aget(self, messages: Optional[List[ChatMessage]] = None, **block_kwargs: Any) -> str:
        records = self._index.memory.documents()
        chats = conversations(self._index.memory.store)
        parts = {record.id for chat in chats.values() for record in chat}
        names = ", ".join(record.name for record in records if record.id not in parts) or "none"
        heading = f"Documents in memory: {names}."
        if chats:
            heading += " Conversations in memory: " + ", ".join(
                f"{chat} ({_turns(chat_parts)})" for chat, chat_parts in chats.items()) + "."
        question = _latest_user_text(messages or [])
        docs = self._attended(chats)
        if not records or not question or docs == []:
            return heading
        nodes = await asyncio.to_thread(self._passages, question, docs)
        by_id = {record.id: record for record in records}
        lines = [f"{heading} Passages the question attends to:"]
        for found in nodes:
            node = found.node
            passage = " ".join(node.get_content().split())[: self.max_chars]
            record = by_id.get(node.metadata["doc_id"])
            turn = turn_at(record, node.start_char_idx) if record is not None else None
            if turn is not None:  # a conversation turn: say whose words they were, and where
                chat = record.metadata["conversation"]
                number = chat["first_turn"] + chat["turns"].index(turn) + 1
                lines.append(f"[conversation {chat['chat_id']}, turn {number}, {turn['role']}] {passage}")
            else:
                lines.append(f'[{node.metadata["document"]}, characters {node.start_char_idx}-{node.end_char_idx}] '
                             f"{passage}")
        return "\n".join(lines)

    def _attended(self, chats: dict) -> Optional[List[str]]:
        """The documents to attend to (None: all): memory_docs, and the conversations if included."""
        docs = self.memory_docs
        if docs is not None and self.include_conversations:
            docs = [*docs, *(record.id for parts in chats.values() for record in parts)]
        return docs

    def _passages(self, question: str, docs: Optional[List[str]]) -> list:
        retriever = self._index.as_retriever(similarity_top_k=self.num_sources, memory_docs=docs,
                                             ranking=self.ranking)
        with self._engine_lock:
            return retriever.retrieve(question)

    async def _aput(self, messages: List[ChatMessage]) -> None:
        """Read the turns into their conversations (the `session_id` Memory gave them, else
        `chat_id`): one new part per conversation, reading only these turns."""
        by_chat: dict[str, list[tuple[str, str]]] = {}
        for message in messages:
            chat = message.additional_kwargs.get("session_id") or self.chat_id or "default"
            role = message.role.value if hasattr(message.role, "value") else str(message.role)
            by_chat.setdefault(str(chat), []).append((role, message.content or ""))
        for chat, turns in by_chat.items():
            result = await asyncio.to_thread(self._append, chat, turns)
            if result is not None:
                self._appended.append(result)

    def _append(self, chat: str, turns: list[tuple[str, str]]) -> AppendResult | None:
        with self._engine_lock:
            return append_turns(self._index.memory, chat, turns)


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


def _turns(parts: list) -> str:
    count = sum(len(part.metadata["conversation"]["turns"]) for part in parts)
    return f"{count} turn" if count == 1 else f"{count} turns"


def _latest_user_text(messages: List[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role == MessageRole.USER and (message.content or "").strip():
            return message.content.strip()
    return ""
