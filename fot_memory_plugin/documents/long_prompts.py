"""Prompts of any length, the FoT way: what does not fit the local context is read into memory.

llama-index packs prompts up to an LLM's `context_window` (retrieved chunks, chat history, an
agent's tool descriptions), and people paste long questions. A FoT model takes a prompt longer than its local context as
LongLLaMA takes a long input: the head is read into memory window by window, the tail (the
memory config's `context_length` tokens) stays in the local context, and the memory layers
search the head beside the stored documents while answering (`MemoryEngine.prompt_head`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import torch

from ..core.engine import MemoryEngine
from .document_memory import Answer, DocumentMemory

logger = logging.getLogger(__name__)

__all__ = ["ask_any_length", "answer_plain", "split_prompt", "trained_positions"]


def trained_positions(engine: MemoryEngine) -> int:
    """The positions the model was trained for: the longest prompt + answer it takes whole, without memory."""
    config = engine.model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or engine.config.context_length)


def split_prompt(engine: MemoryEngine, text: str, keep: int) -> tuple[torch.Tensor | None, str]:
    """(head ids (1, N) or None, the tail text of at most `keep` tokens). The tail is cut at a token
    boundary of `text`, and moved on while it would encode alone to more than `keep` tokens."""
    encoding = engine.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
    cut = len(ids) - keep
    if cut <= 0:
        return None, text
    while cut < len(ids) and len(engine.tokenizer(text[offsets[cut][0]:], add_special_tokens=False).input_ids) > keep:
        cut += 1
    head = torch.tensor([ids[:cut]], dtype=torch.long, device=engine.device)
    return head, text[offsets[cut][0]:] if cut < len(ids) else ""


def ask_any_length(
    memory: DocumentMemory, question: str, *, docs: Sequence[str] | None, chat: bool, answer_mode: str,
    ranking: str, **options: Any,
) -> Answer:
    """`DocumentMemory.ask`, for a question of any length: a question longer than the local
    context (after the chat template, if chat) has its head read into memory beside the documents.

    Re-read answering keeps half the local context for its passages; "passages" mode answers such
    a question as "reread" does (memory attached), since the head is only in memory. Hits in the
    head are never sources (they are no stored token).
    """
    engine = memory.engine
    if len(_prompt_ids(engine, question, chat)) <= engine.config.context_length:
        return memory.ask(question, docs=docs, chat=chat, answer_mode=answer_mode, ranking=ranking, **options)
    text = engine.tokenizer.decode(_prompt_ids(engine, question, chat)) if chat else question
    if answer_mode == "passages":  # the head is only in memory: generate with memory attached
        logger.info("the question is longer than the local context: answering in reread mode")
        answer_mode = "reread"
    keep = engine.config.context_length // (2 if answer_mode == "reread" else 1)
    head, tail = split_prompt(engine, text, keep)
    if ranking == "lift":  # the probe's shares are computed once and cached: now, without the head
        memory.find_sources(tail, docs=docs, chat=False, num_sources=0, ranking=ranking,
                            exact=options.get("exact", False))
    with engine.prompt_head(head) if head is not None else contextlib.nullcontext():
        return memory.ask(tail, docs=docs, chat=False, answer_mode=answer_mode, ranking=ranking, **options)


def answer_plain(
    memory: DocumentMemory, text: str, *, max_new_tokens: int, on_text: Callable[[str], None] | None = None,
    **options: Any,
) -> Answer:
    """The plain model's answer to the prompt `text` (no documents): the whole prompt in context
    while it fits the trained positions, else its head read into memory first."""
    engine = memory.engine
    ids = engine.encode(text)
    if ids.shape[1] + max_new_tokens <= trained_positions(engine):
        return Answer(_generated(engine, ids, max_new_tokens, on_text, dict(options, plain=True)), [])
    head, tail = split_prompt(engine, text, engine.config.context_length)
    with engine.prompt_head(head):
        return Answer(_generated(engine, engine.encode(tail), max_new_tokens, on_text, options), [])


def _prompt_ids(engine: MemoryEngine, question: str, chat: bool) -> torch.Tensor:
    return (engine.chat_prompt(question) if chat else engine.encode(question))[0]


def _generated(engine: MemoryEngine, ids: torch.Tensor, max_new_tokens: int, on_text: Callable[[str], None] | None,
               options: dict[str, Any]) -> str:
    """The text generated after ids (1, N), stripped as DocumentMemory strips its answers."""
    if on_text is None:
        new_ids = engine.generate(ids, max_new_tokens=max_new_tokens, **options)
        return engine.tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()
    pieces = []
    for piece in engine.stream(ids, max_new_tokens=max_new_tokens, **options):
        on_text(piece)
        pieces.append(piece)
    return "".join(pieces).strip()
