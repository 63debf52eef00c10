"""What an adapter hands the memory for each call of a memory layer's attention.

Adapters know model internals (projections, rotary embedding, KV cache); the core knows FoT
(retrieval, the joint softmax). They meet here, so adapters never import the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

__all__ = ["LayerAttentionCall", "MemoryAttentionHandler", "UnsupportedModelError", "AdapterStateError"]


class UnsupportedModelError(ValueError):
    """No adapter handles this model architecture (re-exported by fot_memory_plugin.errors)."""


class AdapterStateError(RuntimeError):
    """Memory attached twice, or detached when not attached (re-exported by fot_memory_plugin.errors)."""


@dataclass
class LayerAttentionCall:
    """One forward call of one memory layer's attention."""

    layer: int
    query: torch.Tensor  # (B, Hq, T, D) position-encoded at the tokens' local positions
    keys: torch.Tensor  # (B, Hkv, S, D) local keys, cache included, position-encoded
    values: torch.Tensor  # (B, Hkv, S, D)
    allowed: torch.Tensor  # bool, broadcastable to (B, 1, T, S): which local keys each query sees
    new_keys: torch.Tensor  # (B, Hkv, T, D) this call's keys BEFORE rotary encoding: what memory stores
    new_values: torch.Tensor  # (B, Hkv, T, D)
    scaling: float  # the layer's softmax scaling, 1/sqrt(D) for Llama
    # Rotary-encodes the pre-RoPE query of this call as if every token sat at one position.
    query_at: Callable[[int], torch.Tensor]


class MemoryAttentionHandler(Protocol):
    """Computes a memory layer's attention output (B, Hq, T, D) for one call."""

    def __call__(self, call: LayerAttentionCall) -> torch.Tensor: ...
