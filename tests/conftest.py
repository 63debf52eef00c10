"""Shared fixtures: tiny random Llama-family models (seconds on a CPU), never a hub download."""

from __future__ import annotations

import os

from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The converted default model is cached inside the checkout, so test runs share it and never
# touch the user's cache.
os.environ.setdefault("FOT_MEMORY_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))

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


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from fot_memory_plugin.models import load_model

    return load_model()
