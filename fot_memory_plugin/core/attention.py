"""FoT memory attention as pure tensor functions.

One softmax over [local causal scores || retrieved memory scores], both scaled by the layer's
scaling; the output mixes local and retrieved values with those weights (DESIGN.md). Query heads
are grouped over key/value heads (GQA) by reshaping, never by copying the keys.

`memory_attention` is the fast path; `memory_attention_reference` is the same thing written the
obvious way (loops, float64) so the two can be compared on random inputs.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "memory_attention",
    "memory_attention_reference",
    "causal_mask",
    "rotate_half",
    "apply_rotary",
]


def causal_mask(query_length: int, key_length: int, device: torch.device | None = None) -> torch.Tensor:
    """Bool (1, 1, T, S): query i (the last T of S positions) sees keys 0 .. S - T + i."""
    return torch.ones(query_length, key_length, dtype=torch.bool, device=device).tril(key_length - query_length)[
        None, None
    ]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotary-embedding partner of x: (-x2, x1) for x = (x1, x2) split on the last axis."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles whose cos and sin are (B or 1, T or 1, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def memory_attention(
    query: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    memory_keys: torch.Tensor | None = None,
    memory_values: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
    memory_query: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Local causal attention plus retrieved memory in one softmax.

    query: (B, Hq, T, D), position-encoded at its local positions.
    local_keys, local_values: (B, Hkv, S, D), Hq a multiple of Hkv; keys position-encoded.
    allowed: bool, broadcastable to (B, 1, T, S); True where a query may see a local key.
    memory_keys, memory_values: (B, Hq, T, K, D) retrieved per query head; memory_mask (B, Hq, T, K).
    memory_query: the query scored against memory keys (for the "fixed" positional mode);
        defaults to `query` ("zero" mode: memory keys sit at position 0).
    Returns the output (B, Hq, T, D) and the attention weights on memory (B, Hq, T, K), or None
    without memory. Softmax runs in float32 whatever the input dtype.
    """
    batch, q_heads, length, dim = query.shape
    kv_heads, key_length = local_keys.shape[1], local_keys.shape[2]
    group = q_heads // kv_heads
    # Group query heads over their shared KV head: (B, Hkv, G*T, D) @ (B, Hkv, D, S).
    grouped = query.reshape(batch, kv_heads, group * length, dim)
    local_scores = torch.matmul(grouped, local_keys.transpose(-1, -2)).float() * scaling
    local_scores = local_scores.view(batch, kv_heads, group, length, key_length)  # (B, Hkv, G, T, S)
    local_scores = local_scores.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    local_scores = local_scores.view(batch, q_heads, length, key_length)  # (B, Hq, T, S)

    if memory_keys is None:
        weights = torch.softmax(local_scores, dim=-1).to(query.dtype)
        output = torch.matmul(weights.view(batch, kv_heads, group * length, key_length), local_values)
        return output.view(batch, q_heads, length, dim), None

    assert memory_values is not None and memory_mask is not None
    memory_query = query if memory_query is None else memory_query
    memory_scores = torch.einsum("bhtd,bhtkd->bhtk", memory_query, memory_keys).float() * scaling  # (B, Hq, T, K)
    memory_scores = memory_scores.masked_fill(~memory_mask, float("-inf"))

    weights = torch.softmax(torch.cat((local_scores, memory_scores), dim=-1), dim=-1).to(query.dtype)
    local_weights, memory_weights = weights.split((key_length, memory_keys.shape[3]), dim=-1)
    output = torch.matmul(local_weights.reshape(batch, kv_heads, group * length, key_length), local_values)
    output = output.view(batch, q_heads, length, dim)
    output = output + torch.einsum("bhtk,bhtkd->bhtd", memory_weights, memory_values)
    return output, memory_weights


def memory_attention_reference(
    query: torch.Tensor,
    local_keys: torch.Tensor,
    local_values: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    memory_keys: torch.Tensor | None = None,
    memory_values: torch.Tensor | None = None,
    memory_mask: torch.Tensor | None = None,
    memory_query: torch.Tensor | None = None,
) -> torch.Tensor:
    """`memory_attention` written the obvious way: one query at a time, in float64."""
    batch, q_heads, length, dim = query.shape
    kv_heads, key_length = local_keys.shape[1], local_keys.shape[2]
    group = q_heads // kv_heads
    allowed = allowed.expand(batch, 1, length, key_length)
    memory_query = query if memory_query is None else memory_query
    output = torch.zeros(batch, q_heads, length, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv = h // group
            for t in range(length):
                scores, vectors = [], []
                for s in range(key_length):
                    if allowed[b, 0, t, s]:
                        scores.append(float(query[b, h, t].double() @ local_keys[b, kv, s].double()) * scaling)
                        vectors.append(local_values[b, kv, s].double())
                if memory_keys is not None:
                    for j in range(memory_keys.shape[3]):
                        if memory_mask[b, h, t, j]:
                            key = memory_keys[b, h, t, j].double()
                            scores.append(float(memory_query[b, h, t].double() @ key) * scaling)
                            vectors.append(memory_values[b, h, t, j].double())
                top = max(scores)
                exps = [math.exp(score - top) for score in scores]
                total = sum(exps)
                for weight, vector in zip(exps, vectors):
                    output[b, h, t] += weight / total * vector
    return output
