"""Block retrieval while reading (BlockMemory): given every block it is exact retrieval; given
fewer it still returns k distinct hits, best first, and scores every window start."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VOCAB, tiny_llama
from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.core.blocks import BlockMemory, BlockSearch, block_means
from fot_memory_plugin.core.memory import ExactMemory


def _filled(*memories, windows: int = 5, window: int = 37, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(windows):
        keys, values = (torch.randn(2, 3, window, 16, generator=generator) for _ in range(2))
        for memory in memories:
            memory.append(keys, values)
    return memories


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_block_memory_given_every_block_is_exact_memory(dtype):
    exact, blocks = _filled(ExactMemory(dtype=dtype), BlockMemory(BlockSearch(block_size=8, blocks=1000), dtype=dtype))
    queries = torch.randn(2, 9, 11, 16, generator=torch.Generator().manual_seed(1))
    for k in (1, 20, 500):  # 500 > the 185 stored: padded, as ExactMemory pads
        want, got = exact.search(queries, k), blocks.search(queries, k)
        assert torch.equal(got.token_ids, want.token_ids)
        assert torch.equal(got.mask, want.mask)
        torch.testing.assert_close(got.keys, want.keys)
        torch.testing.assert_close(got.values, want.values)


def test_block_memory_with_few_blocks_returns_k_distinct_real_hits_and_scores_window_starts():
    (memory,) = _filled(BlockMemory(BlockSearch(block_size=8, blocks=3)))
    keys = memory.keys
    # A query that only the first key of the third window answers (its block mean does not).
    query = torch.zeros(2, 9, 1, 16)
    query[..., 0] = 1.0
    keys[:, :, 74, 0] = 1e3  # token 74 = 2 * 37: a window start, inside block 9 of 8 tokens
    found = memory.search(query, 16)
    assert found.mask.all()
    assert (found.token_ids[..., 0] == 74).all()
    for row in found.token_ids.reshape(-1, 16):
        assert len(set(row.tolist())) == 16  # window starts are not counted twice
    scores = torch.einsum("bhtd,bhtkd->bhtk", query, found.keys)
    assert (scores[..., :-1] >= scores[..., 1:]).all()  # best first


def test_block_means_of_a_partial_last_block():
    keys = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1)
    assert block_means(keys, 4).flatten().tolist() == [1.5, 5.5, 8.5]


def test_engine_reading_with_block_retrieval_given_every_block_equals_exact_reading():
    torch.manual_seed(0)
    ids = torch.randint(0, TINY_VOCAB, (1, 70), generator=torch.Generator().manual_seed(3))
    config = MemoryConfig(local_window=8, top_k=4, mem_attention_grouping=3)
    logits = []
    for memory_class in (ExactMemory, lambda: BlockMemory(BlockSearch(block_size=4, blocks=100))):
        model = tiny_llama()
        with MemoryEngine(model, None, config, {layer: memory_class() for layer in range(2)}) as engine:
            engine.read(ids[:, :62])
            with torch.no_grad():
                logits.append(model(ids[:, 62:]).logits)
    torch.testing.assert_close(logits[0], logits[1])


def test_config_blocks_reads_through_block_memory():
    engine = MemoryEngine(tiny_llama(), None, MemoryConfig(local_window=8, top_k=4, retrieval="blocks"))
    assert all(isinstance(memory, BlockMemory) for memory in engine.memories.values())
    engine.close()
