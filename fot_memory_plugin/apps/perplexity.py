"""Perplexity of a text's last tokens as a function of how much of what precedes them is in memory.

The scored tokens are split into windows of `local_window`. Each window is scored with the
memory read so far (the `memory_tokens` before the scored part, then the scored windows before
it), and then appended to memory, as reading does. A token is predicted only from tokens of its
own window plus memory, so every variant scores the same predictions:
    truncated: each window alone (the model cut to its window);
    memory:    each window plus what its memory layers retrieve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..core.engine import MemoryEngine

__all__ = ["PerplexityResult", "memory_perplexity"]


@dataclass(frozen=True)
class PerplexityResult:
    memory_tokens: int  # tokens read into memory before the scored ones (0 for truncated)
    scored_tokens: int  # predictions scored
    loss: float  # mean next-token negative log-likelihood, nats
    truncated: bool

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"perplexity": self.perplexity}


@torch.no_grad()
def memory_perplexity(
    engine: MemoryEngine, ids: torch.Tensor, memory_tokens: int, scored_tokens: int, *, truncated: bool = False,
    read_retrieval: bool = True,
) -> PerplexityResult:
    """Score the last `scored_tokens` of ids (1, N) after reading the `memory_tokens` before them.

    truncated=True scores each window with the plain model and no memory (memory_tokens ignored).
    read_retrieval=False computes every key that enters memory without retrieval (each window
    seeing only itself, as `fot-memory read --no-retrieval` does); predictions still retrieve.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"memory_perplexity takes ids shaped (1, N), got {tuple(ids.shape)}.")
    total = ids.shape[1]
    if memory_tokens + scored_tokens > total:
        raise ValueError(f"{memory_tokens} memory + {scored_tokens} scored tokens exceed the text's {total} tokens.")
    ids = ids.to(engine.device)
    scored = ids[:, total - scored_tokens :]
    window = engine.config.local_window
    nll, count = 0.0, 0
    engine.reset()
    if truncated:
        with engine.detached() as model:
            for start in range(0, scored_tokens, window):
                nll, count = _add_window(model, scored[:, start : start + window], nll, count)
        return PerplexityResult(0, count, nll / count, truncated=True)
    if memory_tokens:
        engine.read(ids[:, total - scored_tokens - memory_tokens : total - scored_tokens], retrieve=read_retrieval)
    for start in range(0, scored_tokens, window):
        piece = scored[:, start : start + window]
        if read_retrieval:  # one pass: the window is scored with memory, then enters memory
            _, logits = engine.read_window(piece, logits=True)
            nll, count = _add_loss(logits, piece, nll, count)
        else:  # scored with memory; its keys enter memory as a reading without retrieval makes them
            nll, count = _add_window(engine.model, piece, nll, count)
            engine.read_window(piece, retrieve=False)
    engine.reset()
    return PerplexityResult(memory_tokens, count, nll / count, truncated=False)


def _add_window(model: torch.nn.Module, piece: torch.Tensor, nll: float, count: int) -> tuple[float, int]:
    return _add_loss(model(input_ids=piece, use_cache=False).logits, piece, nll, count)


def _add_loss(logits: torch.Tensor, piece: torch.Tensor, nll: float, count: int) -> tuple[float, int]:
    """Add the next-token losses of logits (1, T, V) for piece (1, T) to the running sum."""
    losses = F.cross_entropy(logits[0, :-1].float(), piece[0, 1:], reduction="sum")  # logits (T - 1, V)
    return nll + losses.item(), count + piece.shape[1] - 1
