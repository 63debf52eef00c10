"""Shared fixtures: tiny random Llama-family models (seconds on a CPU), never a hub download."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 128


def tiny_llama(num_layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama with grouped-query attention (kv_heads < heads) unless told otherwise."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def token_ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
