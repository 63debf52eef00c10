"""The Llama-family adapter inside real (tiny, random) transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from conftest import TINY_VOCAB, tiny_llama
from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.core.errors import UnsupportedModelError
from fot_memory_plugin.core.memory import ExactMemory

SMALL = MemoryConfig(local_window=8, top_k=4, mem_attention_grouping=3)


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_empty_memory_leaves_logits_unchanged(attn_implementation, token_ids):
    model = tiny_llama(attn_implementation=attn_implementation)
    plain = _logits(model, token_ids)
    with MemoryEngine(model, None, SMALL):
        torch.testing.assert_close(_logits(model, token_ids), plain, atol=1e-4, rtol=0)


def test_detach_restores_the_original_forward(model, token_ids):
    plain = _logits(model, token_ids)
    engine = MemoryEngine(model, None, SMALL)
    engine.read(_ids(30, 2))
    assert not torch.allclose(_logits(model, token_ids), plain, atol=1e-4)
    engine.close()
    assert all("forward" not in vars(layer.self_attn) for layer in model.model.layers)
    assert torch.equal(_logits(model, token_ids), plain)


def test_only_mem_layers_are_patched(token_ids):
    model = tiny_llama(num_layers=3)
    with MemoryEngine(model, None, SMALL.replace(mem_layers=(1,))):
        patched = ["forward" in vars(layer.self_attn) for layer in model.model.layers]
    assert patched == [False, True, False]


def test_memory_changes_the_output_only_after_reading(model, token_ids):
    with MemoryEngine(model, None, SMALL) as engine:
        before = _logits(model, token_ids)
        assert engine.read(_ids(20, 3)) == 20 and engine.memory_tokens == 20
        after = _logits(model, token_ids)
    assert not torch.allclose(before, after, atol=1e-4)


def test_reading_stores_pre_rope_keys_and_values():
    model = tiny_llama(num_layers=1)
    ids = _ids(8, 4)
    with MemoryEngine(model, None, SMALL) as engine:
        engine.read(ids)
        stored_keys = engine.memories[0].keys
        stored_values = engine.memories[0].values
    attention = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    expected_keys = attention.k_proj(hidden).view(1, 8, 2, -1).transpose(1, 2)
    expected_values = attention.v_proj(hidden).view(1, 8, 2, -1).transpose(1, 2)
    torch.testing.assert_close(stored_keys, expected_keys)
    torch.testing.assert_close(stored_values, expected_values)


def test_a_window_never_retrieves_itself():
    """Reading one window with retrieval on or off stores the same memory (it was empty before)."""
    model = tiny_llama()
    ids = _ids(8, 5)
    with MemoryEngine(model, None, SMALL) as engine:
        engine.read(ids, retrieve=True)
        with_retrieval = engine.memories[1].keys.clone()
        engine.reset()
        engine.read(ids, retrieve=False)
        torch.testing.assert_close(engine.memories[1].keys, with_retrieval)


def test_read_window_is_the_step_that_read_repeats(model):
    """read() == read_window() window after window; read_window's logits are the model's with that
    memory, before the window's own keys enter it (perplexity scores windows this way)."""
    ids = _ids(24, 9)
    with MemoryEngine(model, None, SMALL) as engine:
        engine.read(ids)
        read_keys = engine.memories[1].keys.clone()
        engine.reset()
        engine.read_window(ids[:, :8])
        expected = _logits(model, ids[:, 8:16])
        _, logits = engine.read_window(ids[:, 8:16], logits=True)
        torch.testing.assert_close(logits, expected)
        engine.read_window(ids[:, 16:])
        torch.testing.assert_close(engine.memories[1].keys, read_keys)
        with pytest.raises(ValueError, match="use read"):
            engine.read_window(ids)


def test_prompt_head_is_searched_beside_the_memories_and_then_dropped(model):
    """A prompt head read with prompt_head() answers as if read into memory (the long-input path of
    generate()), stays beside memories that reset() switches in, and is gone after the block."""
    documents, head, tail = _ids(16, 10), _ids(24, 11), _ids(8, 12)
    with MemoryEngine(model, None, SMALL) as engine:
        engine.read(documents)
        stored = engine.memories
        engine.reset()
        engine.read(head)  # read alone, as prompt_head reads it
        both = {layer: ExactMemory() for layer in engine.layers}
        for layer in engine.layers:
            for memory in (stored[layer], engine.memories[layer]):
                both[layer].append(memory.keys, memory.values)
        engine.reset(both)
        expected = _logits(model, tail)
        engine.reset()
        with engine.prompt_head(head):
            assert engine.memory_tokens == 0  # the engine's own memories are untouched
            engine.reset(stored)  # as DocumentMemory.ask switches in the documents
            torch.testing.assert_close(_logits(model, tail), expected, atol=1e-5, rtol=1e-5)
            with pytest.raises(RuntimeError, match="do not nest"):
                with engine.prompt_head(head):
                    pass
        assert engine.router.extra is None and engine.memory_tokens == 16
        assert not torch.allclose(_logits(model, tail), expected, atol=1e-4)


def test_top_k_covering_memory_is_invariant_to_larger_k(model, token_ids):
    outputs = []
    for top_k in (40, 64):
        with MemoryEngine(model, None, SMALL.replace(top_k=top_k)) as engine:
            engine.read(_ids(40, 6))
            outputs.append(_logits(model, token_ids))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_query_chunking_does_not_change_the_output(model, token_ids):
    outputs = []
    for grouping in (1, 5, None):
        with MemoryEngine(model, None, SMALL.replace(mem_attention_grouping=grouping)) as engine:
            engine.read(_ids(30, 7))
            outputs.append(_logits(model, token_ids))
    torch.testing.assert_close(outputs[0], outputs[2])
    torch.testing.assert_close(outputs[1], outputs[2])


@pytest.mark.parametrize("mode", ["zero", "fixed"])
def test_cached_and_uncached_paths_agree_with_memory(mode, model, token_ids):
    with MemoryEngine(model, None, SMALL.replace(positional_mode=mode)) as engine:
        engine.read(_ids(30, 8))
        with torch.no_grad():
            full = model(token_ids).logits[:, -1]
            prefix = model(token_ids[:, :-1], use_cache=True)
            step = model(token_ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-4)


def test_positional_modes_differ_once_memory_holds_something(model, token_ids):
    outputs = {}
    for mode in ("zero", "fixed"):
        with MemoryEngine(model, None, SMALL.replace(positional_mode=mode)) as engine:
            engine.read(_ids(30, 9))
            outputs[mode] = _logits(model, token_ids)
    assert not torch.allclose(outputs["zero"], outputs["fixed"], atol=1e-4)


def test_generate_runs_attached_and_detached(model, token_ids):
    plain = model.generate(input_ids=token_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with MemoryEngine(model, None, SMALL) as engine:
        same = model.generate(input_ids=token_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        engine.read(_ids(30, 10))
        with_memory = engine.generate(token_ids, max_new_tokens=6)
        with engine.detached():
            detached = model.generate(input_ids=token_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(same, plain) and torch.equal(detached, plain)
    assert with_memory.shape[0] == 1 and 0 < with_memory.shape[1] <= 6  # may stop at EOS


@pytest.mark.parametrize(
    "model_class, config_class",
    [(MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config), (Qwen3ForCausalLM, Qwen3Config)],
)
def test_other_llama_family_models(model_class, config_class, token_ids):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    model = model_class(config).eval()
    plain = _logits(model, token_ids)
    with MemoryEngine(model, None, SMALL) as engine:
        torch.testing.assert_close(_logits(model, token_ids), plain, atol=1e-4, rtol=0)
        engine.read(_ids(20, 11))
        assert not torch.allclose(_logits(model, token_ids), plain, atol=1e-4)


def test_unsupported_model_names_what_is_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=TINY_VOCAB))
    with pytest.raises(UnsupportedModelError, match="supported: llama"):
        MemoryEngine(model, None, SMALL)


def test_attaching_twice_is_refused(model):
    with MemoryEngine(model, None, SMALL):
        with pytest.raises(RuntimeError, match="detach that adapter first"):
            MemoryEngine(model, None, SMALL)


def test_mem_layers_beyond_the_model_are_refused(model):
    with pytest.raises(ValueError, match="the model has 2 layers"):
        MemoryEngine(model, None, SMALL.replace(mem_layers=(0, 5)))
