"""The fast memory attention against the plain reference, on random inputs."""

from __future__ import annotations

import pytest
import torch

from fot_memory_plugin.core.attention import causal_mask, memory_attention, memory_attention_reference


def _inputs(seed: int, batch=2, q_heads=6, kv_heads=2, length=5, cached=3, k=4, dim=8):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    keys_length = cached + length
    memory_mask = torch.rand(batch, q_heads, length, k, generator=generator) > 0.3
    return dict(
        query=rand(batch, q_heads, length, dim),
        local_keys=rand(batch, kv_heads, keys_length, dim),
        local_values=rand(batch, kv_heads, keys_length, dim),
        allowed=causal_mask(length, keys_length),
        scaling=dim**-0.5,
        memory_keys=rand(batch, q_heads, length, k, dim),
        memory_values=rand(batch, q_heads, length, k, dim),
        memory_mask=memory_mask,
    )


def _relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    return ((fast.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("seed", range(3))
def test_memory_attention_matches_reference_with_gqa(seed):
    inputs = _inputs(seed)
    fast, weights = memory_attention(**inputs)
    assert fast.shape == (2, 6, 5, 8) and weights.shape == (2, 6, 5, 4)
    assert _relative_error(fast, memory_attention_reference(**inputs)) < 1e-5
    # Masked-out memory slots get exactly zero weight.
    assert torch.all(weights[~inputs["memory_mask"]] == 0)


def test_local_only_matches_reference():
    inputs = _inputs(7)
    for name in ("memory_keys", "memory_values", "memory_mask"):
        inputs.pop(name)
    fast, weights = memory_attention(**inputs)
    assert weights is None
    assert _relative_error(fast, memory_attention_reference(**inputs)) < 1e-5


def test_separate_memory_query_matches_reference():
    inputs = _inputs(11)
    inputs["memory_query"] = torch.randn_like(inputs["query"])
    fast, _ = memory_attention(**inputs)
    assert _relative_error(fast, memory_attention_reference(**inputs)) < 1e-5


def test_all_memory_masked_equals_local_attention():
    inputs = _inputs(3)
    inputs["memory_mask"] = torch.zeros_like(inputs["memory_mask"])
    with_memory, _ = memory_attention(**inputs)
    for name in ("memory_keys", "memory_values", "memory_mask"):
        inputs.pop(name)
    local_only, _ = memory_attention(**inputs)
    torch.testing.assert_close(with_memory, local_only)


def test_joint_softmax_equals_attention_over_concatenated_keys():
    """Memory attention is ordinary attention over [memory ; local] with memory always visible."""
    inputs = _inputs(5, batch=1, q_heads=2, kv_heads=2, k=6)
    inputs["memory_mask"] = torch.ones_like(inputs["memory_mask"])
    # The same memory for every position: then it is a plain prefix of keys.
    shared_keys = inputs["memory_keys"][:, :, :1].expand_as(inputs["memory_keys"]).contiguous()
    shared_values = inputs["memory_values"][:, :, :1].expand_as(inputs["memory_values"]).contiguous()
    fast, _ = memory_attention(**{**inputs, "memory_keys": shared_keys, "memory_values": shared_values})
    keys = torch.cat((shared_keys[:, :, 0], inputs["local_keys"]), dim=2)
    values = torch.cat((shared_values[:, :, 0], inputs["local_values"]), dim=2)
    allowed = torch.cat((torch.ones(1, 1, 5, 6, dtype=torch.bool), inputs["allowed"]), dim=-1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        inputs["query"], keys, values, attn_mask=allowed, scale=inputs["scaling"]
    )
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-6)
