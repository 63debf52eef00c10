"""Read long inputs into FoT memory, then generate with the memory layers retrieving from it.

Reading follows LongLLaMA's `_handle_long_input`: the tokens are split into windows of
`local_window`; each window attends causally to itself plus what its memory layers retrieve from
the windows before it; then that window's pre-RoPE keys and values are appended to memory.
A prompt runs in the local context (positions from 0) with retrieval from memory; only a prompt
longer than `last_context_length` sends its head to memory first.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any, Callable, Iterator, Mapping

import torch
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from ..adapters import adapter_for, num_layers
from .blocks import BlockMemory
from .config import MemoryConfig
from .memory import ExactMemory, Memory
from .router import MemoryRouter

__all__ = ["MemoryEngine", "WindowCallback"]

logger = logging.getLogger(__name__)

# Called after each window is read: (start token, end token, {layer: (keys, values) (B, Hkv, T, D)}).
WindowCallback = Callable[[int, int, Mapping[int, tuple[torch.Tensor, torch.Tensor]]], None]


class MemoryEngine:
    """A causal LM with FoT memory attached to its memory layers.

    >>> engine = MemoryEngine(model, tokenizer, MemoryConfig(local_window=512))
    >>> engine.read(long_text)
    >>> engine.answer("What is the pass key?")
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        config: MemoryConfig | None = None,
        memories: Mapping[int, Memory] | None = None,
        *,
        base_weights: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """base_weights: the parameters a FoT delta changed, as the base model has them
        (`LoadedModel.base_weights`); plain generation answers with them."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or MemoryConfig()
        parameters = dict(model.named_parameters())
        self._base_weights = {name: weight.to(device=parameters[name].device, dtype=parameters[name].dtype)
                              for name, weight in (base_weights or {}).items()}
        self.layers = self.config.layers_for(num_layers(model))
        self.router = MemoryRouter(self.config, memories or self._fresh_memories())
        self.adapter = adapter_for(model, self.layers, self.router).attach()

    # -- memory ---------------------------------------------------------------------------------

    def _fresh_memories(self) -> dict[int, Memory]:
        dtype = getattr(torch, self.config.ram_dtype)
        if self.config.retrieval == "blocks":
            return {layer: BlockMemory(dtype=dtype) for layer in self.layers}
        return {layer: ExactMemory(dtype=dtype) for layer in self.layers}

    @property
    def memories(self) -> dict[int, Memory]:
        return self.router.memories

    @property
    def memory_tokens(self) -> int:
        """Tokens held in memory (every memory layer holds the same tokens)."""
        return len(next(iter(self.memories.values())))

    def reset(self, memories: Mapping[int, Memory] | None = None) -> None:
        """Forget everything read (or switch to other memories)."""
        self.router.memories = dict(memories or self._fresh_memories())

    def close(self) -> None:
        """Detach memory: the model is the plain model again."""
        if self.adapter.attached:
            self.adapter.detach()

    def __enter__(self) -> MemoryEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def detached(self) -> Iterator[torch.nn.Module]:
        """The plain model for the duration (baselines in benchmarks)."""
        self.adapter.detach()
        try:
            yield self.model
        finally:
            self.adapter.attach()

    @contextlib.contextmanager
    def base_model(self) -> Iterator[torch.nn.Module]:
        """Memory detached and the base model's weights in place of a FoT delta's, for the
        duration: a delta trains the memory layers to attend to memory, and text in the prompt
        alone is what the base model was tuned for (benchmarks/README.md, "Long-document QA")."""
        parameters = dict(self.model.named_parameters())
        tuned = {name: parameters[name].data for name in self._base_weights}
        with self.detached():
            try:
                for name, weight in self._base_weights.items():
                    parameters[name].data = weight
                yield self.model
            finally:
                for name, weight in tuned.items():
                    parameters[name].data = weight

    # -- reading --------------------------------------------------------------------------------

    def encode(self, text: str) -> torch.Tensor:
        """Token ids (1, N) of plain text, without special tokens other than the tokenizer's BOS."""
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        return ids.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def read(
        self,
        text_or_ids: str | torch.Tensor,
        *,
        retrieve: bool = True,
        progress: bool = False,
        on_window: WindowCallback | None = None,
    ) -> int:
        """Read text or ids (1, N) into memory window by window; returns tokens read.

        retrieve=False reads without retrieval (each window sees only itself): faster, and the
        memory of later windows then carries no information from earlier ones.
        """
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else text_or_ids.to(self.device)
        if ids.dim() != 2:
            raise ValueError(f"read takes token ids shaped (B, N); got {tuple(ids.shape)}.")
        window = self.config.local_window
        total = ids.shape[1]
        bar = tqdm(total=total, unit="tok", desc="reading", disable=not progress, leave=False)
        try:
            for start in range(0, total, window):
                end = min(start + window, total)
                captured, _ = self.read_window(ids[:, start:end], retrieve=retrieve)
                if on_window is not None:
                    on_window(start, end, captured)
                bar.update(end - start)
        finally:
            bar.close()
        return total

    @torch.no_grad()
    def read_window(
        self, ids: torch.Tensor, *, retrieve: bool = True, logits: bool = False
    ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """One reading step: ids (B, T), T <= local_window, attend to themselves plus memory, then
        their memory-layer keys and values are appended to memory.

        Returns the captured {layer: (keys, values) (B, Hkv, T, D)} and, with logits=True, the
        next-token logits (B, T, V) of the same forward pass (perplexity scores them), else None.
        """
        if ids.shape[1] > self.config.local_window:
            raise ValueError(f"read_window takes at most local_window={self.config.local_window} tokens, got "
                             f"{ids.shape[1]}: use read() for longer input.")
        previous, self.router.retrieve = self.router.retrieve, retrieve
        try:
            with self.router.capture() as captured:
                if logits:
                    scores = self.model(input_ids=ids, use_cache=False).logits
                else:
                    self.adapter.decoder(input_ids=ids, use_cache=False)
                    scores = None
        finally:
            self.router.retrieve = previous
        for layer in self.layers:
            self.memories[layer].append(*captured[layer])
        return captured, scores

    @contextlib.contextmanager
    def prompt_head(self, head_ids: torch.Tensor) -> Iterator[None]:
        """Read head_ids (1, N), the head of a prompt too long for the local context, into a
        memory of its own, which every memory layer searches beside the engine's memories (which
        `reset` may switch meanwhile, to stored documents for example) until the block ends.

        This is how a FoT model takes a prompt longer than its window (LongLLaMA reads a long
        input's head into memory the same way): the tail stays in the local context.
        """
        if self.router.extra is not None:
            raise RuntimeError("prompt_head blocks do not nest: finish the current prompt first.")
        saved = self.router.memories
        head = self._fresh_memories()
        self.router.memories = head
        try:
            self.read(head_ids)
        finally:
            self.router.memories = saved
        self.router.extra = head
        try:
            yield
        finally:
            self.router.extra = None

    # -- generation -----------------------------------------------------------------------------

    def _split_prompt(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Read a prompt's head into memory if it is longer than the local context; return its tail."""
        keep = self.config.context_length
        if prompt_ids.shape[1] > keep:
            self.read(prompt_ids[:, :-keep])
            return prompt_ids[:, -keep:]
        return prompt_ids

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.9,
        streamer: BaseStreamer | None = None,
        plain: bool = False,
        **generate_options: Any,
    ) -> torch.Tensor:
        """New token ids (1, M) continuing prompt_ids (1, N), the memory layers retrieving from memory.

        plain=True runs the base model (`base_model()`) over the whole prompt in its context,
        memory unused (a baseline, an LLM asked without documents, or passages read as text).
        Further keyword arguments go to `model.generate` (for example min_new_tokens).
        """
        prompt_ids = prompt_ids.to(self.device) if plain else self._split_prompt(prompt_ids.to(self.device))
        options: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            options.update(temperature=temperature, top_p=top_p)
        else:  # silence generation_config's sampling defaults under greedy decoding
            options.update(temperature=None, top_p=None, top_k=None)
        with self.base_model() if plain else contextlib.nullcontext():
            output = self.model.generate(
                input_ids=prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                max_new_tokens=max_new_tokens,
                pad_token_id=self._pad_token_id(),
                streamer=streamer,
                **options,
                **generate_options,
            )
        return output[:, prompt_ids.shape[1] :]

    def _pad_token_id(self) -> int | None:
        for source in (self.tokenizer, self.model.generation_config):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None)
                if value is not None:
                    return value[0] if isinstance(value, list) else value
        return 0

    def chat_prompt(self, question: str) -> torch.Tensor:
        """Token ids (1, N) of a user question in the tokenizer's chat template."""
        messages = [{"role": "user", "content": question}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = f"Question: {question}\nAnswer:"
        return self.encode(text)

    def answer(self, question: str, *, chat: bool = True, max_new_tokens: int = 64, **options: Any) -> str:
        """The model's answer to a question about what was read."""
        prompt = self.chat_prompt(question) if chat else self.encode(question)
        new_ids = self.generate(prompt, max_new_tokens=max_new_tokens, **options)
        return self.tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()

    def stream(self, prompt_ids: torch.Tensor, **options: Any) -> Iterator[str]:
        """Generate like `generate`, yielding text pieces as tokens arrive."""
        streamer = _TextQueueStreamer(self.tokenizer)
        worker = threading.Thread(target=self._generate_into, args=(prompt_ids, streamer, options), daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if streamer.error is not None:
            raise streamer.error

    def _generate_into(self, prompt_ids: torch.Tensor, streamer: _TextQueueStreamer, options: dict) -> None:
        try:
            self.generate(prompt_ids, streamer=streamer, **options)
        except BaseException as error:  # surfaced in the consuming thread
            streamer.error = error
            streamer.end()


class _TextQueueStreamer(BaseStreamer):
    """Decodes generated tokens incrementally and hands text pieces to an iterator."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.tokens: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.error: BaseException | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first puts the prompt
            self.prompt_seen = True
            return
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.queue.put(text[len(self.sent) :])
        self.sent = text

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if len(text) > len(self.sent):  # a piece held back for a character that never completed
            self.queue.put(text[len(self.sent) :])
            self.sent = text
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (piece := self.queue.get()) is not None:
            if piece:
                yield piece
