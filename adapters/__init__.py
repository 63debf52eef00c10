"""Model-family adapters: find a model's memory layers and route their attention through memory.

Installed as `fot_memory_plugin.adapters`; import it only by that name.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .base import AdapterStateError, LayerAttentionCall, MemoryAttentionHandler, UnsupportedModelError
from .llama import LLAMA_FAMILY, LlamaFamilyAdapter

__all__ = [
    "AdapterStateError",
    "LayerAttentionCall",
    "MemoryAttentionHandler",
    "UnsupportedModelError",
    "LlamaFamilyAdapter",
    "SUPPORTED_MODEL_TYPES",
    "adapter_for",
    "num_layers",
]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = LLAMA_FAMILY


def adapter_for(model: nn.Module, layers: Sequence[int], handler: MemoryAttentionHandler) -> LlamaFamilyAdapter:
    """The adapter for this model's family (chosen by `config.model_type`), not yet attached."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LLAMA_FAMILY:
        return LlamaFamilyAdapter(model, layers, handler)
    raise UnsupportedModelError(
        f"No memory adapter for model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def num_layers(model: nn.Module) -> int:
    """Decoder layers of a supported model."""
    return int(model.config.num_hidden_layers)
