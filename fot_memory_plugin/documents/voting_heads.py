"""Which memory heads vote when passages are ranked for a question.

Most memory-attention heads attend to the same places whatever is asked (a document's opening,
punctuation, formatting runs); a few follow the question (QRHead, Zhang et al. 2025, finds the
same in large models). A `VotingHeads` profile names those few per memory layer. It is chosen
once per model on calibration questions whose evidence is known, from books that no benchmark
asks about (`benchmarks/calibrate_heads.py`), and shipped beside the package in
`fot_memory_plugin/heads/<model>.json`. Ranking then sums the attention of these heads only.

A head's calibration score is its QRHead-style retrieval score: the share of its memory
attention that lands on the evidence chunks under the question, minus the share under a
question-independent probe, averaged over the calibration questions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["VotingHeads", "HEADS_DIR", "head_scores", "select_heads"]

logger = logging.getLogger(__name__)

HEADS_DIR = Path(__file__).parent / "heads"
_FORMAT = 1


@dataclass(frozen=True)
class VotingHeads:
    """Per memory layer, the query heads whose memory attention ranks passages."""

    heads: Mapping[int, tuple[int, ...]]  # layer -> query head indices
    model_id: str = ""
    config_hash: str = ""
    calibration: Mapping[str, Any] | None = None  # how they were chosen (figures, data, date)

    def __post_init__(self) -> None:
        if not any(self.heads.values()):
            raise ValueError("A VotingHeads profile needs at least one head; use None to let every head vote.")

    def mask(self, layer: int, num_heads: int, device: torch.device | None = None) -> torch.Tensor | None:
        """(num_heads,) 1.0 for the voting heads of `layer`, 0.0 for the others."""
        chosen = self.heads.get(layer, ())
        weights = torch.zeros(num_heads, device=device)
        weights[list(chosen)] = 1.0
        return weights

    def to_dict(self) -> dict[str, Any]:
        return {"format": _FORMAT, "model_id": self.model_id, "config_hash": self.config_hash,
                "heads": {str(layer): list(heads) for layer, heads in sorted(self.heads.items())},
                "calibration": dict(self.calibration or {})}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> VotingHeads:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT:
            raise ValueError(f"{path}: voting-heads format {data.get('format')!r} is not {_FORMAT}; "
                             "re-run benchmarks/calibrate_heads.py.")
        return cls({int(layer): tuple(heads) for layer, heads in data["heads"].items()},
                   data.get("model_id", ""), data.get("config_hash", ""), data.get("calibration"))

    @classmethod
    def for_model(cls, load_as: str | None, fingerprint: Mapping[str, Any] | None,
                  mem_layers: Sequence[int]) -> VotingHeads | None:
        """The shipped profile of model `load_as` if it fits this model and these memory layers."""
        if not load_as:
            return None
        path = HEADS_DIR / f"{load_as}.json"
        if not path.is_file():
            return None
        profile = cls.load(path)
        model = (fingerprint or {}).get("model", {})
        if (profile.model_id, profile.config_hash) != (model.get("model_id"), model.get("config_hash")):
            logger.info("voting heads of %s were calibrated on another model: every head votes", load_as)
            return None
        if not set(profile.heads) <= set(mem_layers):
            logger.info("voting heads of %s name layers outside the memory layers %s: every head votes",
                        load_as, list(mem_layers))
            return None
        return profile


def head_scores(per_head_question: np.ndarray, per_head_probe: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """One calibration question's score for every head.

    per_head_question, per_head_probe: (H, C) each head's share of its memory attention per chunk
    (rows sum to 1 or 0); evidence: (C,) bool, the chunks holding the answer. Returns (H,).
    """
    return per_head_question[:, evidence].sum(axis=1) - per_head_probe[:, evidence].sum(axis=1)


def select_heads(scores: np.ndarray, labels: Sequence[tuple[int, int]], count: int) -> dict[int, tuple[int, ...]]:
    """The `count` best heads by mean score. scores: (Q, H) per question; labels[h] = (layer, head)."""
    best = np.argsort(-scores.mean(axis=0))[:count]
    chosen: dict[int, list[int]] = {}
    for index in best:
        layer, head = labels[index]
        chosen.setdefault(layer, []).append(head)
    return {layer: tuple(sorted(heads)) for layer, heads in sorted(chosen.items())}
