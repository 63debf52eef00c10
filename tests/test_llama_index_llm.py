"""FoTMemoryLLM as llama-index sees it: a real CustomLLM over a real store, real callbacks and
instrumentation, a tiny random model with SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from llama_index.core import Settings
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import (
    LLMChatEndEvent,
    LLMChatStartEvent,
    LLMCompletionEndEvent,
    LLMCompletionStartEvent,
)
from llama_index.core.llms import LLM, ChatMessage, CustomLLM

from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.integrations.llama_index.llm import FoTMemoryLLM
from llama_index_helpers import *  # noqa: F403 (fixtures)
from llama_index_helpers import CONFIG, QUESTION

TEXTS: dict[str, str] = {}


@pytest.fixture
def llm(store_dir, library):
    for path in library.iterdir():
        TEXTS[path.name] = path.read_text(encoding="utf-8")
    model = FoTMemoryLLM(store_dir, max_new_tokens=6, readonly=True)
    yield model
    model.close()


def test_class_hierarchy_fields_and_metadata(llm, tiny_model_dir):
    assert issubclass(FoTMemoryLLM, CustomLLM) and issubclass(FoTMemoryLLM, LLM) and issubclass(FoTMemoryLLM, BaseLLM)
    for name in ("store_path", "model_name", "memory_docs", "max_new_tokens", "num_sources", "generate_kwargs",
                 "context_window", "is_chat_model", "system_prompt", "query_wrapper_prompt", "stopping_ids",
                 "answer_mode", "ranking"):
        assert FoTMemoryLLM.model_fields[name].description, f"field {name} has no description"
    dumped = llm.model_dump()
    assert dumped["memory_docs"] is None and "_memory" not in dumped and "model" not in dumped
    assert llm.model is llm.memory.engine.model and llm.tokenizer is llm.memory.engine.tokenizer
    assert llm.store is llm.memory.store
    meta = llm.metadata
    # The model's trained positions, with documents too: a longer prompt's head is read into memory.
    assert (meta.context_window, meta.num_output, meta.model_name) == (512, 6, str(tiny_model_dir))
    assert not meta.is_chat_model and not meta.is_function_calling_model
    plain = FoTMemoryLLM(document_memory=llm.memory, memory_docs=[], context_window=4096, is_chat_model=True)
    assert (plain.metadata.context_window, plain.metadata.is_chat_model) == (4096, True)
    previous = Settings._llm
    try:
        Settings.llm = llm
        assert Settings.llm is llm
    finally:
        Settings._llm = previous


def test_complete_answers_from_memory_with_sources_into_the_document(llm, store_dir):
    response = llm.complete(QUESTION)
    with DocumentMemory.open(store_dir, readonly=True) as memory:
        expected = memory.ask(QUESTION, chat=False, max_new_tokens=6)
    assert response.text == expected.text
    sources = response.additional_kwargs["sources"]
    assert sources == [source.to_dict() for source in expected.sources] and len(sources) == 3
    for source in sources:
        assert TEXTS[source["doc"]][source["start_char"] : source["end_char"]] == source["text"]


def test_stream_complete_yields_deltas_that_add_up_to_complete(llm):
    chunks = list(llm.stream_complete(QUESTION))
    assert len(chunks) >= 2 and all(chunk.text.startswith(chunks[0].text) for chunk in chunks)
    assert "".join(chunk.delta for chunk in chunks) == chunks[-1].text
    complete = llm.complete(QUESTION)
    assert chunks[-1].text == complete.text  # the same text, not merely the same after strip()
    assert chunks[-1].additional_kwargs["sources"] == complete.additional_kwargs["sources"]


def test_chat_goes_through_the_tokenizers_chat_template(llm):
    messages = [ChatMessage(role="system", content="Answer briefly."), ChatMessage(role="user", content="Who came?")]
    prompt = llm.messages_to_prompt(messages)
    assert prompt == llm.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who came?"}],
        tokenize=False, add_generation_prompt=True,
    )
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    reply = llm.chat(messages)
    assert reply.message.role == "assistant"
    assert reply.message.content == llm.complete(prompt, formatted=True).text
    streamed = list(llm.stream_chat(messages))
    assert streamed[-1].message.content == reply.message.content


def test_memory_docs_choose_what_the_memory_layers_attend_to(llm):
    only = llm.complete(QUESTION, memory_docs=["persuasion.txt"])
    assert only.additional_kwargs["sources"] and {s["doc"] for s in only.additional_kwargs["sources"]} == {"persuasion.txt"}
    scoped = FoTMemoryLLM(document_memory=llm.memory, memory_docs=["chapter1.txt"], max_new_tokens=6)
    assert {s["doc"] for s in scoped.complete(QUESTION).additional_kwargs["sources"]} == {"chapter1.txt"}
    # memory_docs=[]: the plain model, exactly what transformers generates without memory.
    plain = llm.complete(QUESTION, memory_docs=[])
    assert plain.additional_kwargs["sources"] == []
    ids = llm.tokenizer(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
    with llm.memory.engine.detached() as model:
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                   do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
    assert plain.text == llm.tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True).strip()


class _Recorder(BaseEventHandler):
    events: list[Any] = []

    @classmethod
    def class_name(cls) -> str:
        return "Recorder"

    def handle(self, event: Any, **kwargs: Any) -> None:
        self.events.append(event)


def test_callbacks_and_instrumentation_events_fire_as_for_official_llms(llm):
    debug = LlamaDebugHandler()
    llm.callback_manager = CallbackManager([debug])
    recorder = _Recorder(events=[])
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(recorder)
    try:
        llm.complete(QUESTION)
        list(llm.stream_complete(QUESTION))
        llm.chat([ChatMessage(role="user", content="Who came?")])
    finally:
        dispatcher.event_handlers.remove(recorder)
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) >= 3 and all(len(pair) == 2 for pair in pairs)
    assert pairs[0][1].payload["completion"].text == llm.complete(QUESTION).text
    kinds = [type(event) for event in recorder.events]
    assert kinds.count(LLMCompletionStartEvent) >= 2 and kinds.count(LLMCompletionEndEvent) >= 2
    assert LLMChatStartEvent in kinds and LLMChatEndEvent in kinds
    start = next(event for event in recorder.events if isinstance(event, LLMCompletionStartEvent))
    assert start.prompt == QUESTION
