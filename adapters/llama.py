"""Memory adapter for the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM2).

It replaces the `forward` of the chosen layers' attention modules on the instance (the class is
untouched), computes queries, pre-RoPE keys and values exactly as the original does, keeps the
normal KV cache, and hands the attention itself to a `MemoryAttentionHandler`. Detaching deletes
the instance attribute, so the original forward is back bit for bit.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .base import AdapterStateError, LayerAttentionCall, MemoryAttentionHandler, UnsupportedModelError

__all__ = ["LlamaFamilyAdapter", "LLAMA_FAMILY"]

# config.model_type values whose attention has the Llama shape: q/k/v/o projections, rotary
# position embeddings passed in as (cos, sin), and `past_key_values.update(k, v, layer_idx)`.
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


class LlamaFamilyAdapter:
    """Routes the attention of `layers` of a Llama-family model through a memory handler.

    Use as a context manager, or call `attach()` / `detach()`.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], handler: MemoryAttentionHandler) -> None:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in LLAMA_FAMILY:
            raise UnsupportedModelError(
                f"No memory adapter for model_type {model_type!r}; supported: {', '.join(LLAMA_FAMILY)}."
            )
        self.model = model
        self.decoder = _decoder(model)
        num_layers = len(self.decoder.layers)
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad:
            raise ValueError(f"Layers {bad} do not exist: the model has {num_layers} layers (0..{num_layers - 1}).")
        self.layers = tuple(layers)
        self.handler = handler
        self.attached = False

    @property
    def attention_modules(self) -> list[nn.Module]:
        return [self.decoder.layers[layer].self_attn for layer in self.layers]

    def attach(self) -> LlamaFamilyAdapter:
        if self.attached:
            raise AdapterStateError("Memory is already attached to this model: detach it first.")
        for module in self.attention_modules:
            if "forward" in vars(module):
                raise AdapterStateError(
                    f"Layer {module.layer_idx} already has a patched forward (another adapter is attached): "
                    "detach that adapter first."
                )
        for module in self.attention_modules:
            module.forward = types.MethodType(_memory_forward(self, self.decoder.rotary_emb), module)
        self.attached = True
        return self

    def detach(self) -> None:
        if not self.attached:
            raise AdapterStateError("Memory is not attached to this model: nothing to detach.")
        for module in self.attention_modules:
            del module.forward  # the class's own forward shows through again
        self.attached = False

    def __enter__(self) -> LlamaFamilyAdapter:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        if self.attached:
            self.detach()


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding `layers` and `rotary_emb` (model.model for *ForCausalLM)."""
    for candidate in (getattr(model, "model", None), model):
        if candidate is not None and hasattr(candidate, "layers") and hasattr(candidate, "rotary_emb"):
            return candidate
    raise UnsupportedModelError(
        f"{type(model).__name__} has no decoder with `layers` and `rotary_emb`: pass the *ForCausalLM model "
        "or its base model."
    )


def _memory_forward(adapter: LlamaFamilyAdapter, rotary_emb: nn.Module) -> Callable[..., Any]:
    def forward(
        self: nn.Module,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hq, T, D)
        keys = self.k_proj(hidden_states).view(shape).transpose(1, 2)  # (B, Hkv, T, D)
        values = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if hasattr(self, "q_norm"):  # Qwen3 normalises per head before rotary encoding
            query, keys = self.q_norm(query), self.k_norm(keys)

        rotate = _rotary_function(self)
        cos, sin = position_embeddings
        query_rotated, keys_rotated = rotate(query, keys, cos, sin)
        local_keys, local_values = keys_rotated, values
        if past_key_values is not None:
            local_keys, local_values = past_key_values.update(keys_rotated, values, self.layer_idx)

        def query_at(position: int) -> torch.Tensor:
            ids = torch.full((batch, 1), position, dtype=torch.long, device=query.device)
            cos_p, sin_p = rotary_emb(query, ids)  # (B, 1, D): one angle for every token
            return rotate(query, query, cos_p, sin_p)[0]

        call = LayerAttentionCall(
            layer=self.layer_idx,
            query=query_rotated,
            keys=local_keys,
            values=local_values,
            allowed=_allowed(attention_mask, length, local_keys.shape[2], query.device),
            new_keys=keys,
            new_values=values,
            scaling=self.scaling,
            query_at=query_at,
        )
        output = adapter.handler(call)  # (B, Hq, T, D)
        output = output.transpose(1, 2).reshape(batch, length, -1)
        return self.o_proj(output), None

    return forward


def _rotary_function(module: nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The model family's own `apply_rotary_pos_emb`, so patched and original agree bit for bit."""
    return sys.modules[type(module).__module__].apply_rotary_pos_emb


def _allowed(mask: torch.Tensor | None, length: int, key_length: int, device: torch.device) -> torch.Tensor:
    """Which local keys each query may see, as bool broadcastable to (B, 1, T, S).

    transformers passes None (plain causal, for sdpa), a 4-D bool mask, or a 4-D additive float
    mask (eager); sliding windows and padding arrive inside the 4-D masks.
    """
    causal = torch.ones(length, key_length, dtype=torch.bool, device=device).tril(key_length - length)[None, None]
    if mask is None:
        return causal
    if mask.dim() == 2:  # (B, S) padding mask
        return causal & mask[:, None, None, -key_length:].bool()
    mask = mask[..., -length:, :key_length]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2
