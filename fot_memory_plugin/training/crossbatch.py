"""FoT cross-batch attention (Tworkowski et al. 2023, section 3.2): the training-time memory layer.

A training batch holds, for each of N documents, two consecutive windows of W tokens:

    rows 0 .. N-1     the PREVIOUS window of documents 0 .. N-1
    rows N .. 2N-1    the CURRENT window of the same documents, in the same order

Documents are grouped d at a time (rows g*d .. g*d+d-1). In a memory layer, the current window of
document b attends, in ONE softmax, to its own causal context plus the pre-RoPE keys of the
previous windows of every document in its group: its own (the positive) and d-1 others (the
negatives). Memory keys sit at position 0 (no rotation; the query keeps its local position, as
in LongLLaMA's `zero` mode). Previous windows attend only to themselves. Everything is
differentiable, so the loss of a current window trains the key projections of the previous
windows: the model learns keys that stand out among distractors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..adapters import LayerAttentionCall

__all__ = ["CrossBatchAttention", "cross_batch_memory", "pair_rows"]


def pair_rows(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Stack (N, W) previous windows over (N, W) current windows into the (2N, W) batch layout."""
    if previous.shape != current.shape:
        raise ValueError(f"previous {tuple(previous.shape)} and current {tuple(current.shape)} windows differ in shape.")
    return torch.cat([previous, current], dim=0)


def cross_batch_memory(previous: torch.Tensor, group_size: int) -> torch.Tensor:
    """The memory each document sees: (N, H, W, D) previous windows -> (N, H, d*W, D).

    Document b's memory is the previous windows of its group, in document order, so it holds
    its own previous window and d-1 from other documents.
    """
    docs, heads, window, dim = previous.shape
    if docs % group_size:
        raise ValueError(f"{docs} documents do not split into groups of {group_size}: make the batch a multiple of d.")
    groups = previous.view(docs // group_size, group_size, heads, window, dim)
    memory = groups.transpose(1, 2).reshape(docs // group_size, 1, heads, group_size * window, dim)
    return memory.expand(-1, group_size, -1, -1, -1).reshape(docs, heads, group_size * window, dim)


class CrossBatchAttention:
    """The `MemoryAttentionHandler` of memory layers during FoT training.

    `group_size` (the paper's d) may change between steps (a curriculum); d = 1 shows each
    document only its own previous window.
    """

    def __init__(self, group_size: int = 1) -> None:
        self.group_size = group_size

    def __call__(self, call: LayerAttentionCall) -> torch.Tensor:
        rows, _, length, _ = call.query.shape
        if rows % 2:
            raise ValueError(f"Cross-batch training needs previous and current windows stacked (2N rows), got {rows} rows.")
        if call.keys.shape[2] != length:
            raise ValueError("Cross-batch training runs without a KV cache: call the model with use_cache=False.")
        docs = rows // 2
        previous, current = slice(0, docs), slice(docs, rows)

        previous_output = _attend(call.query[previous], call.keys[previous], call.values[previous], call.scaling)
        memory_keys = cross_batch_memory(call.new_keys[previous], self.group_size)  # (N, Hkv, d*W, D), position 0
        memory_values = cross_batch_memory(call.new_values[previous], self.group_size)
        keys = torch.cat([memory_keys, call.keys[current]], dim=2)  # (N, Hkv, d*W + T, D)
        values = torch.cat([memory_values, call.values[current]], dim=2)
        current_output = _attend(call.query[current], keys, values, call.scaling)
        return torch.cat([previous_output, current_output], dim=0)


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention (B, Hq, T, D) over (B, Hkv, S, D) keys whose last T are the queries' own positions
    (causal) and whose first S - T (memory) every query sees.

    That is a causal mask aligned to the bottom-right corner: passed as a `CausalBias`, not a mask
    tensor, so the flash kernel runs on a GPU (windows are full: training batches carry no
    padding). Key/value heads are repeated for the query heads: that kernel takes no groups.
    """
    repeats = query.shape[1] // keys.shape[1]
    # Under autocast the rotated query and keys come out float32 while values are bf16; the
    # CausalBias path bypasses autocast's casting, so match them here as autocast would.
    query, keys = query.to(values.dtype), keys.to(values.dtype)
    keys = keys.repeat_interleave(repeats, dim=1)
    values = values.repeat_interleave(repeats, dim=1)
    mask = causal_lower_right(query.shape[2], keys.shape[2])
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling)
