"""The exact in-RAM memory: the Memory contract, fixed shapes, GQA head mapping."""

from __future__ import annotations

import pytest
import torch

from fot_memory_plugin.core.attention import causal_mask, memory_attention
from fot_memory_plugin.core.memory import ExactMemory, Memory


def _filled(tokens=20, batch=1, kv_heads=2, dim=8, chunks=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    memory = ExactMemory()
    keys = torch.randn(batch, kv_heads, tokens, dim, generator=generator)
    values = torch.randn(batch, kv_heads, tokens, dim, generator=generator)
    for piece in torch.arange(tokens).tensor_split(chunks):
        memory.append(keys[:, :, piece], values[:, :, piece])
    return memory, keys, values


def test_satisfies_the_memory_protocol():
    assert isinstance(ExactMemory(), Memory)


def test_empty_memory_gives_all_false_mask_of_fixed_shape():
    hits = ExactMemory().search(torch.randn(1, 4, 3, 8), k=5)
    assert hits.keys.shape == hits.values.shape == (1, 4, 3, 5, 8)
    assert hits.mask.shape == (1, 4, 3, 5) and not hits.mask.any()
    assert torch.all(hits.token_ids == -1)


def test_appends_in_chunks_keep_every_token_in_order():
    memory, keys, values = _filled(tokens=700, chunks=7)  # crosses the doubling boundary
    assert len(memory) == 700
    torch.testing.assert_close(memory.keys, keys)
    torch.testing.assert_close(memory.values, values)


def test_search_returns_brute_force_top_k_per_query_head():
    memory, keys, values = _filled()
    queries = torch.randn(1, 6, 4, 8)  # 6 query heads over 2 KV heads: heads 0-2 -> 0, 3-5 -> 1
    hits = memory.search(queries, k=5)
    for head in range(6):
        kv = head // 3
        for t in range(4):
            scores = keys[0, kv] @ queries[0, head, t]
            expected = scores.topk(5).indices
            assert hits.token_ids[0, head, t].tolist() == expected.tolist()
            torch.testing.assert_close(hits.keys[0, head, t], keys[0, kv, expected])
            torch.testing.assert_close(hits.values[0, head, t], values[0, kv, expected])


def test_k_is_clamped_to_what_is_stored_and_padded_with_masked_slots():
    memory, _, _ = _filled(tokens=3, chunks=1)
    hits = memory.search(torch.randn(1, 2, 2, 8), k=8)
    assert hits.keys.shape == (1, 2, 2, 8, 8)
    assert hits.mask[..., :3].all() and not hits.mask[..., 3:].any()
    assert torch.all(hits.token_ids[..., 3:] == -1)


def test_top_k_covering_memory_equals_dense_attention_over_all_memory():
    memory, keys, values = _filled(tokens=12, kv_heads=2)
    query = torch.randn(1, 4, 5, 8)
    local_keys, local_values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    hits = memory.search(query, k=12)
    retrieved, _ = memory_attention(
        query, local_keys, local_values, causal_mask(5, 5), 8**-0.5, hits.keys, hits.values, hits.mask
    )
    # Dense: every memory token visible to every query, as a prefix of the local keys.
    dense_keys = torch.cat((keys, local_keys), dim=2).repeat_interleave(2, dim=1)
    dense_values = torch.cat((values, local_values), dim=2).repeat_interleave(2, dim=1)
    allowed = torch.cat((torch.ones(1, 1, 5, 12, dtype=torch.bool), causal_mask(5, 5)), dim=-1)
    dense = torch.nn.functional.scaled_dot_product_attention(query, dense_keys, dense_values, attn_mask=allowed)
    torch.testing.assert_close(retrieved, dense, rtol=1e-5, atol=1e-6)


def test_append_rejects_a_shape_from_another_layer():
    memory, _, _ = _filled(kv_heads=2)
    with pytest.raises(ValueError, match="one memory per layer"):
        memory.append(torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8))
    assert len(memory) == 20  # nothing stored was touched


def test_half_precision_memory_searches_in_the_query_dtype():
    memory = ExactMemory(dtype=torch.float16)
    memory.append(torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8))
    hits = memory.search(torch.randn(1, 1, 2, 8), k=4)
    assert hits.keys.dtype == torch.float32 and hits.mask.all()


def test_joined_memory_searches_both_as_one_and_hides_the_extra_ids():
    """JoinedMemory(main, extra) finds what one exact memory over both finds; hits in `extra`
    carry id -1 (they are no token of `main`), and appends go to `extra`."""
    from fot_memory_plugin.core.memory import JoinedMemory

    generator = torch.Generator().manual_seed(3)
    first, second = torch.randn(1, 2, 10, 8, generator=generator), torch.randn(1, 2, 6, 8, generator=generator)
    main, extra, both = ExactMemory(), ExactMemory(), ExactMemory()
    main.append(first, first + 1)
    both.append(first, first + 1)
    joined = JoinedMemory(main, extra)
    assert len(joined) == 10 and joined.search(torch.randn(1, 4, 3, 8), 4).token_ids.max() < 10
    joined.append(second, second + 1)
    both.append(second, second + 1)
    assert (len(main), len(extra), len(joined)) == (10, 6, 16)
    queries = torch.randn(1, 4, 5, 8, generator=generator)
    got, expected = joined.search(queries, 5), both.search(queries, 5)
    torch.testing.assert_close(got.keys, expected.keys)
    torch.testing.assert_close(got.values, expected.values)
    assert torch.equal(got.mask, expected.mask)
    in_main = expected.token_ids < 10
    assert torch.equal(got.token_ids[in_main], expected.token_ids[in_main]) and (got.token_ids[~in_main] == -1).all()
    assert in_main.any() and (~in_main).any()
    alone = JoinedMemory(ExactMemory(), extra).search(queries, 20)  # k beyond what is stored: padded, masked
    assert alone.mask.sum(-1).eq(6).all() and (alone.token_ids == -1).all()
