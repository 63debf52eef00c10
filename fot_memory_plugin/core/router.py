"""The memory side of a memory layer: capture what is read, retrieve, attend.

`MemoryRouter` is the `MemoryAttentionHandler` the adapters call. Per call it
1. keeps this call's pre-RoPE keys and values when reading (`capture`), so the reader can append
   them to memory AFTER the window has run (a window never retrieves itself);
2. retrieves top-k memory keys per query head and position, in chunks of
   `mem_attention_grouping` query positions to bound the (B, Hq, chunk, k, D) tensors;
3. computes the joint local + memory softmax (attention.memory_attention);
4. optionally reports the attention weight each memory token received (for citations).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ..adapters import LayerAttentionCall
from .attention import memory_attention
from .config import MemoryConfig
from .memory import JoinedMemory, Memory

__all__ = ["MemoryRouter", "AttentionRecorder"]

# Called with (layer, token_ids (B, Hq, T, k), weights (B, Hq, T, k)) for every memory read.
AttentionRecorder = Callable[[int, torch.Tensor, torch.Tensor], None]


class MemoryRouter:
    """Connects memory layers to their memories under one MemoryConfig."""

    def __init__(self, config: MemoryConfig, memories: Mapping[int, Memory]) -> None:
        self.config = config
        self.memories = dict(memories)
        self.retrieve = True  # False: memory layers see only the local window (a baseline)
        self.recorder: AttentionRecorder | None = None
        # Searched beside `memories` while set (MemoryEngine.prompt_head): {layer: memory}.
        self.extra: dict[int, Memory] | None = None
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """Collect {layer: (pre-RoPE keys, values) (B, Hkv, T, D)} of the forward calls inside."""
        self._captured = {}
        try:
            yield self._captured
        finally:
            self._captured = None

    @contextlib.contextmanager
    def recording(self, recorder: AttentionRecorder) -> Iterator[None]:
        """Report memory attention weights to `recorder` for the calls inside."""
        previous, self.recorder = self.recorder, recorder
        try:
            yield
        finally:
            self.recorder = previous

    def __call__(self, call: LayerAttentionCall) -> torch.Tensor:
        if self._captured is not None:
            self._captured[call.layer] = (call.new_keys, call.new_values)
        memory = self.memories.get(call.layer)
        if self.extra is not None and memory is not None:
            memory = JoinedMemory(memory, self.extra[call.layer])
        if not self.retrieve or memory is None or len(memory) == 0:
            return _local_attention(call)
        if self.config.positional_mode == "fixed":
            memory_query = call.query_at(self.config.query_position)
        else:
            memory_query = call.query  # memory keys sit at position 0: rotation by 0 is the identity
        return self._attend_in_chunks(call, memory, memory_query)

    def _attend_in_chunks(self, call: LayerAttentionCall, memory: Memory, memory_query: torch.Tensor) -> torch.Tensor:
        length = call.query.shape[2]
        step = self.config.mem_attention_grouping or length
        allowed = call.allowed.expand(-1, -1, length, -1)
        outputs = []
        for start in range(0, length, step):
            rows = slice(start, start + step)
            hits = memory.search(memory_query[:, :, rows], self.config.top_k)
            output, weights = memory_attention(
                call.query[:, :, rows],
                call.keys,
                call.values,
                allowed[:, :, rows],
                call.scaling,
                memory_keys=hits.keys,
                memory_values=hits.values,
                memory_mask=hits.mask,
                memory_query=memory_query[:, :, rows],
            )
            if self.recorder is not None and weights is not None:
                self.recorder(call.layer, hits.token_ids, weights)
            outputs.append(output)
        return torch.cat(outputs, dim=2)


def _local_attention(call: LayerAttentionCall) -> torch.Tensor:
    """Attention over the local window alone: the fused kernel, nothing to join with memory."""
    return F.scaled_dot_product_attention(
        call.query, call.keys, call.values, attn_mask=call.allowed, scale=call.scaling, enable_gqa=True
    )
