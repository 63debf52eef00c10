"""`FoTMemoryLLM`: a llama-index LLM whose memory layers attend to documents in a FoT store.

Completion prompts are answered by `DocumentMemory.ask` over the chosen documents (every
document in the store unless `memory_docs` says otherwise); chat messages go through the
tokenizer's chat template first. With no documents to attend to (`memory_docs=[]`, or an
empty store) it is the plain model, so it also serves prompts that llama-index builds itself
(agents, RAG synthesis). Each response carries the passages that drew the most memory attention
in `additional_kwargs["sources"]`.

A prompt longer than the local context is taken the FoT way: its head is read into memory,
window by window, and searched beside the documents while the tail (the memory config's
`context_length` tokens) stays in the local context (LongLLaMA handles long inputs so). That is
what lets `context_window` (default: the model's trained positions, 8192 for SmolLM2) be far
larger than the local window, as llama-index's prompt packing needs.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence

from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts.base import BasePromptTemplate, PromptTemplate
from llama_index.core.types import PydanticProgramMode

from ...core.config import DEFAULT_ANSWER_MODE, DEFAULT_RANKING, AnswerMode, Ranking
from ...documents.document_memory import Answer, DocumentMemory
from .function_calling import RefusesFunctionCalling, refuse_function_agent
from ...documents.long_prompts import answer_plain, ask_any_length, trained_positions
from .streaming import StrippedDeltas, in_thread

__all__ = ["FoTMemoryLLM"]

logger = logging.getLogger(__name__)

# Keyword arguments of complete()/chat() that are ours; the rest go to model.generate.
_CALL_OPTIONS = ("memory_docs", "max_new_tokens", "num_sources", "answer_mode", "ranking")


class FoTMemoryLLM(RefusesFunctionCalling, CustomLLM):
    """A Hugging Face causal LM with FoT memory over documents read into a store.

    Example:
        ```python
        from llama_index.core import Settings
        from llama_index.llms.fot_memory import FoTMemoryLLM

        llm = FoTMemoryLLM("~/fot-store", memory_docs=["pride_and_prejudice_ch1-4.txt"], max_new_tokens=8)
        print(llm.complete("Netherfield Park is let at last, to a young man named Mr."))
        print(llm.complete("...", memory_docs=["emma.txt"]).additional_kwargs["sources"])
        Settings.llm = llm  # VectorStoreIndex / SummaryIndex query and chat engines, ReActAgent
        ```
    """

    store_path: str = Field(description="Directory of the FoT memory store the documents were read into.")
    model_name: str = Field(description="The model's id, as the store recorded it.")
    context_window: int = Field(
        gt=0,
        description="Prompt plus answer tokens one call takes. The last `context_length` prompt tokens of the "
        "memory config stay in the local context; anything before them is read into memory first (the FoT way "
        "of taking long inputs), so larger values are true too, at the cost of reading time. Default: the "
        "model's trained positions (max_position_embeddings; 8192 for SmolLM2).",
    )
    max_new_tokens: int = Field(default=64, gt=0, description="The most tokens generated per call (num_output).")
    is_chat_model: bool = Field(
        default=False,
        description="Tell llama-index to send chat messages rather than completion prompts. Messages go through "
        "the tokenizer's chat template (or `messages_to_prompt`); the default model answers completion-style "
        "prompts more reliably.",
    )
    system_prompt: Optional[str] = Field(
        default=None,
        description="Extra instructions put before every prompt: before a completion prompt (with a blank line), "
        "or as the system message of a chat that has none.",
    )
    query_wrapper_prompt: Optional[BasePromptTemplate] = Field(
        default=None,
        exclude=True,
        description="A template with a `{query_str}` placeholder that wraps every unformatted completion prompt "
        "(for example the model card's instruction format).",
    )
    stopping_ids: List[int] = Field(
        default_factory=list,
        description="Token ids that end generation when predicted, besides the model's end-of-sequence tokens.",
    )
    memory_docs: Optional[List[str]] = Field(
        default=None,
        description="Documents (names or ids) the memory layers attend to: None means every document "
        "in the store, [] none (the plain model). A call's memory_docs keyword overrides it.",
    )
    num_sources: int = Field(default=3, ge=0, description="Source passages reported per answer.")
    answer_mode: AnswerMode = Field(
        default=DEFAULT_ANSWER_MODE,
        description="'memory': the memory layers attend to the documents while answering; 'passages': the "
        "passages the prompt draws memory attention to are put, as text, before it and answered from with "
        "memory detached; 'reread': the same with memory attached (see documents/passages.py).",
    )
    ranking: Ranking = Field(
        default=DEFAULT_RANKING,
        description="How passages are ranked: 'lift' (attention beyond a question-independent probe) or "
        "'attention' (plain share).",
    )
    generate_kwargs: Dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for generation: do_sample, temperature, top_p, min_new_tokens, ...",
    )

    _memory: DocumentMemory = PrivateAttr()
    _owns_memory: bool = PrivateAttr(default=False)

    def __init__(
        self,
        store_path: str | os.PathLike[str] | None = None,
        *,
        memory_docs: Sequence[str] | None = None,
        model: str | None = None,
        device: str | None = None,
        readonly: bool = False,
        document_memory: DocumentMemory | None = None,
        context_window: int | None = None,
        max_new_tokens: int = 64,
        num_sources: int = 3,
        answer_mode: AnswerMode = DEFAULT_ANSWER_MODE,
        ranking: Ranking = DEFAULT_RANKING,
        is_chat_model: bool = False,
        stopping_ids: Sequence[int] | None = None,
        generate_kwargs: Dict[str, Any] | None = None,
        callback_manager: CallbackManager | None = None,
        system_prompt: str | None = None,
        query_wrapper_prompt: str | BasePromptTemplate | None = None,
        messages_to_prompt: Callable[[Sequence[ChatMessage]], str] | None = None,
        completion_to_prompt: Callable[[str], str] | None = None,
        pydantic_program_mode: PydanticProgramMode = PydanticProgramMode.DEFAULT,
    ) -> None:
        """Open the store at `store_path` (default: `default_store_dir()`) with the model it
        recorded (`model` for a new store), or share an open `document_memory`."""
        owns = document_memory is None
        if document_memory is None:
            document_memory = DocumentMemory.open(store_path, model=model, device=device, readonly=readonly)
        fingerprint = document_memory.store.fingerprint or {}
        if isinstance(query_wrapper_prompt, str):
            query_wrapper_prompt = PromptTemplate(query_wrapper_prompt)
        super().__init__(
            store_path=str(document_memory.store.path),
            model_name=(fingerprint.get("model") or {}).get("model_id") or str(model or "smollm2"),
            context_window=context_window or trained_positions(document_memory.engine),
            memory_docs=None if memory_docs is None else list(memory_docs),
            max_new_tokens=max_new_tokens,
            num_sources=num_sources,
            answer_mode=answer_mode,
            ranking=ranking,
            is_chat_model=is_chat_model,
            stopping_ids=list(stopping_ids or []),
            generate_kwargs=dict(generate_kwargs or {}),
            callback_manager=callback_manager or CallbackManager([]),
            system_prompt=system_prompt,
            query_wrapper_prompt=query_wrapper_prompt,
            messages_to_prompt=messages_to_prompt or _ChatTemplate(self),
            completion_to_prompt=completion_to_prompt,
            pydantic_program_mode=pydantic_program_mode,
        )
        self._memory = document_memory
        self._owns_memory = owns

    @classmethod
    def class_name(cls) -> str:
        return "FoTMemoryLLM"

    # -- the objects underneath -----------------------------------------------------------------

    @property
    def memory(self) -> DocumentMemory:
        return self._memory

    @property
    def model(self) -> Any:
        return self._memory.engine.model

    @property
    def tokenizer(self) -> Any:
        return self._memory.engine.tokenizer

    @property
    def store(self) -> Any:
        return self._memory.store

    def close(self) -> None:
        """Close the store and detach memory, if this LLM opened them."""
        if self._owns_memory:
            self._memory.close()

    @property
    def metadata(self) -> LLMMetadata:
        """context_window: prompt tokens kept in the local context when answering from memory
        (the memory config's `context_length`), the model's positions when no documents are chosen."""
        refuse_function_agent(self)  # FunctionAgent asks here first: answer with our sentence (function_calling.py)
        plain = self._documents(self.memory_docs) is None
        engine = self._memory.engine
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        window = positions if plain and positions else engine.config.context_length
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=self.is_chat_model,
            is_function_calling_model=False,
            model_name=self.model_name,
        )

    # -- llama-index's LLM interface --------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._answer(*self._prepare(prompt, formatted, kwargs))
        return _response(answer.text, answer)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        """Deltas as they are generated; their sum, and the last response's text, equal `complete`'s text
        (leading and trailing whitespace dropped as `complete` drops it)."""
        prepared = self._prepare(prompt, formatted, kwargs)

        def responses() -> CompletionResponseGen:
            content, trimmed = "", StrippedDeltas()
            for item in in_thread(lambda on_text: self._answer(*prepared, on_text=on_text)):
                if isinstance(item, Answer):  # the last item: the finished answer with its sources
                    yield _response(content, item, delta="")
                    return
                delta = trimmed.feed(item)
                if delta:
                    content += delta
                    yield CompletionResponse(text=content, delta=delta)

        return responses()

    # chat() and stream_chat() come from CustomLLM: messages_to_prompt (the tokenizer's chat
    # template unless given: _ChatTemplate) and then complete(formatted=True), inside llama-index's
    # callbacks.

    def _prepare(
        self, prompt: str, formatted: bool, kwargs: dict[str, Any]
    ) -> tuple[str, list[str] | Literal["all"] | None, int, dict[str, Any], dict[str, Any]]:
        options = {**self.generate_kwargs, **kwargs}
        docs = self._documents(options.pop("memory_docs", self.memory_docs))
        max_new_tokens = int(options.pop("max_new_tokens", self.max_new_tokens))
        num_sources = int(options.pop("num_sources", self.num_sources))
        # How to answer from memory: options of DocumentMemory.ask, not of generation.
        memory_options = {"answer_mode": options.pop("answer_mode", self.answer_mode),
                          "ranking": options.pop("ranking", self.ranking), "num_sources": num_sources}
        if self.stopping_ids and "eos_token_id" not in options:
            options["eos_token_id"] = _end_ids(self.model) + list(self.stopping_ids)
        text = prompt if formatted else self.completion_to_prompt(self._extend_prompt(prompt))
        return text, docs, max_new_tokens, memory_options, options

    def _documents(self, memory_docs: Sequence[str] | None) -> list[str] | Literal["all"] | None:
        """The document ids to attend to, "all" (every stored one; damaged ones are then left out
        rather than refused), or None for the plain model (none chosen, or none stored)."""
        if memory_docs is not None:
            return [self._memory.store.document(doc).id for doc in memory_docs] or None
        return "all" if self._memory.documents() else None

    def _answer(
        self, text: str, docs: list[str] | Literal["all"] | None, max_new_tokens: int, memory_options: dict[str, Any],
        options: dict[str, Any], on_text: Callable[[str], None] | None = None,
    ) -> Answer:
        """Generate for the prompt `text`, from the documents' memory (docs) or as the plain model."""
        if docs is None:
            return answer_plain(self._memory, text, max_new_tokens=max_new_tokens, on_text=on_text, **options)
        return ask_any_length(self._memory, text, docs=_named(docs), chat=False, max_new_tokens=max_new_tokens,
                              on_text=on_text, **memory_options, **options)


class _ChatTemplate:
    """The default messages_to_prompt: chat messages in the tokenizer's chat template, ready for
    the reply, with the LLM's system_prompt as the system message of a chat that has none. (A
    callable object rather than a bound method, whose repr would recurse into the LLM's.)"""

    def __init__(self, llm: FoTMemoryLLM) -> None:
        self._llm = weakref.ref(llm)

    def __repr__(self) -> str:
        return "<the tokenizer's chat template>"

    def __call__(self, messages: Sequence[ChatMessage]) -> str:
        llm = self._llm()
        messages = list(messages)
        if llm.system_prompt and not (messages and messages[0].role == MessageRole.SYSTEM):
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=llm.system_prompt))
        tokenizer = llm.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            return generic_messages_to_prompt(messages)
        turns = [{"role": message.role.value, "content": message.content or ""} for message in messages]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)


def _end_ids(model: Any) -> list[int]:
    value = getattr(model.generation_config, "eos_token_id", None)
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [int(value)]


def _named(docs: list[str] | Literal["all"]) -> list[str] | None:
    return None if docs == "all" else docs


def _response(text: str, answer: Answer, delta: str | None = None) -> CompletionResponse:
    sources = [source.to_dict() for source in answer.sources]
    left_out = [item.to_dict() for item in answer.left_out]  # damaged documents the answer could not use
    return CompletionResponse(text=text, delta=delta, raw=answer.to_dict(),
                              additional_kwargs={"sources": sources, "left_out": left_out})
