"""Conversations in FoT memory: chat turns appended to a store, each append reading only the new turns.

A conversation is a chain of parts. Each part is an ordinary document of the store (its own
directory, hnswlib indexes, chunks and SQLite row, written and published atomically like any
document) holding the turns of one append. An append reads its new turns window by window
with the memory layers attending to the conversation's earlier parts as stored (their keys and
values are never recomputed, copied or rewritten), so the model reads each token once: what a
continuous read of the whole conversation would compute if every append began a new window.

    >>> result = append_turns(memory, "chat-42", [("user", "My locker code is 4512."),
    ...                                         ("assistant", "Noted.")])   # doctest: +SKIP
    >>> result.tokens_read, result.part
    (19, 1)

A part's record metadata says what it is: `metadata["conversation"]` = {"chat_id", "part",
"first_turn", "turns": [{"role", "start_char", "end_char", "start_token", "end_token"}]}.
Its text is the transcript "role: content" per line, so a passage cited from it names its
speaker. Two processes appending to one conversation serialize on the store's writer lock: an
append waits while another writer holds it, and one that finds the conversation changed once it
holds the lock starts again.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..core.errors import ConversationNameTakenError
from ..core.memory import ExactMemory, Retrieved
from ..persistence import DocumentRecord, DuplicateDocumentError, MemoryStore, PersistentMemory, StoreLockedError

__all__ = ["AppendResult", "ConversationNameTakenError", "CONVERSATION_KEY", "append_turns", "conversation_parts", "conversations",
           "is_conversation", "turn_at", "ContinuedMemory"]

logger = logging.getLogger(__name__)

CONVERSATION_KEY = "conversation"  # DocumentRecord.metadata[CONVERSATION_KEY] of every part
TURN_CHUNK_TOKENS = 64  # a turn longer than this is cited in pieces of this many tokens


@dataclass(frozen=True)
class AppendResult:
    """What one append stored."""

    record: DocumentRecord  # the new part
    chat_id: str
    part: int  # 1 for the first part of a conversation
    tokens_read: int  # tokens the model read: the new turns', never the earlier parts'
    memory_tokens: int  # tokens of earlier parts the new turns attended to


def is_conversation(record: DocumentRecord) -> bool:
    return isinstance(record.metadata.get(CONVERSATION_KEY), dict)


def conversations(store: MemoryStore) -> dict[str, list[DocumentRecord]]:
    """Every stored conversation: chat id -> its parts in order."""
    found: dict[str, list[DocumentRecord]] = {}
    for record in store.documents():
        if is_conversation(record):
            found.setdefault(record.metadata[CONVERSATION_KEY]["chat_id"], []).append(record)
    return {chat: sorted(parts, key=lambda r: r.metadata[CONVERSATION_KEY]["part"]) for chat, parts in found.items()}


def conversation_parts(store: MemoryStore, chat_id: str) -> list[DocumentRecord]:
    """The stored parts of one conversation, oldest first (empty if it has none)."""
    return conversations(store).get(chat_id, [])


def turn_at(record: DocumentRecord, start_char: int) -> dict[str, Any] | None:
    """The turn of a conversation part that holds character `start_char` (None if it is no part)."""
    if not is_conversation(record):
        return None
    for turn in record.metadata[CONVERSATION_KEY]["turns"]:
        if turn["start_char"] <= start_char < turn["end_char"]:
            return turn
    return None


def append_turns(memory: Any, chat_id: str, turns: Sequence[tuple[str, str]], *,
                 wait: float = 30.0) -> AppendResult | None:
    """Read (role, text) turns into the conversation `chat_id` of `memory` (a DocumentMemory) as
    its next part; returns what was stored, or None when no turn has text.

    The new turns attend to the conversation's earlier parts through memory; nothing earlier is
    read again. Atomic: the part is published like any document, or not at all. While another
    process writes to the store, the append waits and tries again, for up to `wait` seconds
    (then StoreLockedError).
    """
    if not isinstance(chat_id, str) or not chat_id.strip():
        raise ValueError(f"chat_id must be a non-empty string naming the conversation, got {chat_id!r}.")
    turns = [(str(role), text) for role, text in turns if isinstance(text, str) and text.strip()]
    if not turns:
        return None
    text, char_spans = _transcript(turns)
    encoding = memory.engine.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    token_spans = _token_spans(char_spans, offsets)
    started = time.monotonic()
    while True:
        try:
            result = _try_append(memory, chat_id, text, turns, char_spans, token_spans, encoding["input_ids"],
                                 offsets)
        except StoreLockedError:
            result = None  # another writer holds the store: wait for it below
        if result is not None:
            return result
        if time.monotonic() - started > wait:
            raise StoreLockedError(str(memory.store.path), time.monotonic() - started)
        time.sleep(random.uniform(0.05, 0.2))


def _try_append(memory: Any, chat_id: str, text: str, turns: list[tuple[str, str]],
                char_spans: list[tuple[int, int]], token_spans: list[tuple[int, int]], input_ids: list[int],
                offsets: list[tuple[int, int]]) -> AppendResult | None:
    """One attempt; None when another process appended to the conversation first."""
    store, engine = memory.store, memory.engine
    earlier = conversation_parts(store, chat_id)
    part = earlier[-1].metadata[CONVERSATION_KEY]["part"] + 1 if earlier else 1
    first_turn = sum(len(record.metadata[CONVERSATION_KEY]["turns"]) for record in earlier)
    metadata = {CONVERSATION_KEY: {
        "chat_id": chat_id, "part": part, "first_turn": first_turn,
        "turns": [{"role": role, "start_char": chars[0], "end_char": chars[1], "start_token": tokens[0],
                   "end_token": tokens[1]} for (role, _), chars, tokens in zip(turns, char_spans, token_spans)],
    }}
    name = _part_name(chat_id, part)
    try:
        writer = store.begin_document(name, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
                                      text_length=len(text), metadata=metadata, dtype=engine.config.mem_dtype)
    except DuplicateDocumentError:
        taken = store.document(name)
        if (taken.metadata.get(CONVERSATION_KEY) or {}).get("chat_id") != chat_id:
            raise ConversationNameTakenError(
                f"The store holds a document named {name!r} (id {taken.id}) that is not part {part} of "
                f"conversation {chat_id!r}, so that part cannot be written: forget or rename that document, "
                "or use another chat id."
            ) from None
        return None  # another process appended part `part` first: start again
    with writer:  # holds the writer lock: the conversation cannot change until commit
        if [record.id for record in conversation_parts(store, chat_id)] != [record.id for record in earlier]:
            writer.abort()
            return None
        writer.add_chunks(_turn_chunks(text, token_spans, offsets))
        ids = torch.tensor([input_ids], dtype=torch.long)
        exact = engine.config.retrieval == "exact"
        dtype = getattr(torch, engine.config.ram_dtype)
        engine.reset({layer: ContinuedMemory(store.memory(layer, earlier, exact=exact) if earlier else None,
                                             ExactMemory(dtype=dtype)) for layer in engine.layers})

        def to_store(start: int, end: int, captured: dict) -> None:
            for layer, (keys, values) in captured.items():
                writer.append(layer, keys[0], values[0])  # (Hkv, T, D)

        try:
            read = engine.read(ids, on_window=to_store)
        finally:
            engine.reset()
    assert writer.record is not None
    memory_tokens = sum(record.num_tokens for record in earlier)
    logger.info("conversation %r part %d: read %d new tokens beside %d in memory", chat_id, part, read, memory_tokens)
    return AppendResult(writer.record, chat_id, part, read, memory_tokens)


def _transcript(turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The part's text ("role: text" per turn, one line each) and each turn's character span."""
    pieces, spans, position = [], [], 0
    for role, content in turns:
        piece = f"{role}: {content.strip()}\n"
        pieces.append(piece)
        spans.append((position, position + len(piece)))
        position += len(piece)
    return "".join(pieces), spans


def _token_spans(char_spans: list[tuple[int, int]], offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each turn's tokens [start, end): a token belongs to the turn its first character is in."""
    spans, token = [], 0
    for index, (_, end_char) in enumerate(char_spans):
        start = token
        last = index == len(char_spans) - 1
        while token < len(offsets) and (last or offsets[token][0] < end_char):
            token += 1
        spans.append((start, token))
    return spans


def _turn_chunks(text: str, token_spans: list[tuple[int, int]],
                 offsets: list[tuple[int, int]]) -> list[tuple[int, int, int, int, str]]:
    """Citation chunks: every turn on its own, in pieces of at most TURN_CHUNK_TOKENS tokens."""
    chunks = []
    for start, end in token_spans:
        for piece in range(start, end, TURN_CHUNK_TOKENS):
            stop = min(piece + TURN_CHUNK_TOKENS, end)
            start_char, end_char = offsets[piece][0], offsets[stop - 1][1]
            chunks.append((piece, stop, start_char, end_char, text[start_char:end_char]))
    return chunks


def _part_name(chat_id: str, part: int) -> str:
    """A document name for a part: the chat id made safe (with a digest where that changed it)."""
    label = re.sub(r"[/\\\x00-\x1f\x7f]", "_", chat_id)[:120]
    if label != chat_id:
        label += "~" + hashlib.sha256(chat_id.encode("utf-8")).hexdigest()[:8]
    return f"chat {label} part {part}"


class ContinuedMemory:
    """A `Memory` (memory.py) for one memory layer during an append: the conversation's stored parts (read-only) followed by
    the keys of the windows read so far (in RAM), searched as one memory. Token ids of the new
    keys follow the stored ones."""

    def __init__(self, stored: PersistentMemory | None, fresh: ExactMemory) -> None:
        self.stored, self.fresh = stored, fresh

    def __len__(self) -> int:
        return (len(self.stored) if self.stored is not None else 0) + len(self.fresh)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.fresh.append(keys, values)

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        """The exact top-k of the union: the best k of each side's top-k, re-scored together."""
        stored = len(self.stored) if self.stored is not None else 0
        fresh = self.fresh.search(queries, k)
        fresh = fresh._replace(token_ids=torch.where(fresh.mask, fresh.token_ids + stored, fresh.token_ids))
        if stored == 0:
            return fresh
        old = Retrieved(*self.stored.search(queries, k))
        if len(self.fresh) == 0:
            return old
        keys = torch.cat([old.keys, fresh.keys], dim=3)  # (B, Hq, T, 2k, D)
        scores = torch.einsum("bhtd,bhtkd->bhtk", queries, keys)
        mask = torch.cat([old.mask, fresh.mask], dim=3)
        best = scores.masked_fill(~mask, float("-inf")).topk(k, dim=3).indices  # (B, Hq, T, k)

        def pick(tensor: torch.Tensor) -> torch.Tensor:
            index = best if tensor.dim() == 4 else best[..., None].expand(*best.shape, tensor.shape[-1])
            return tensor.gather(3, index)

        values = torch.cat([old.values, fresh.values], dim=3)
        ids = torch.cat([old.token_ids, fresh.token_ids], dim=3)
        return Retrieved(pick(keys), pick(values), pick(mask), pick(ids))
