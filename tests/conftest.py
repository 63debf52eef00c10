"""Shared fixtures: tiny random Llama-family models (seconds on a CPU), never a hub download."""

from __future__ import annotations

import os

from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The converted default model is cached inside the checkout, so test runs share it and never
# touch the user's cache.
os.environ.setdefault("FOT_MEMORY_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
# Ray (tests/test_ray_*.py): a local cluster on the loopback address only. Ray reads this when it
# is imported and otherwise advertises the machine's outward address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 128
# A real document and a completion whose answer lies in its first chapter.
BOOK = Path(__file__).resolve().parents[1] / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
QUESTION = "Netherfield Park is let at last, to a young man named Mr."


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
    from fot_memory_plugin.models.loading import load_model

    return load_model()


@pytest.fixture(scope="session")
def smollm2_fot():
    """The shipped FoT-tuned model: SmolLM2 with the smollm2-fot delta (memory in its 5 trained layers)."""
    from fot_memory_plugin.models.loading import load_model

    return load_model("smollm2-fot")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random Llama saved with SmolLM2's tokenizer (and chat template), loadable by path."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=smollm2.tokenizer.eos_token_id, bos_token_id=smollm2.tokenizer.bos_token_id,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    smollm2.tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the session (2 CPUs, loopback only, no dashboard); skips without Ray."""
    ray = pytest.importorskip("ray")
    env = {name: os.environ[name] for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FOT_MEMORY_CACHE",
                                               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env={"env_vars": env},
             log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
