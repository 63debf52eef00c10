"""FoT cross-batch training (paper section 3.2): data, the training-time memory layer, the loop."""

from __future__ import annotations

from .crossbatch import CrossBatchAttention, cross_batch_memory, pair_rows
from .data import TokenCorpus, text_files
from .trainer import DEFAULT_MEM_LAYERS, CrossBatchTrainer, StepResult, TrainConfig, window_losses

__all__ = [
    "CrossBatchAttention",
    "CrossBatchTrainer",
    "DEFAULT_MEM_LAYERS",
    "StepResult",
    "TokenCorpus",
    "TrainConfig",
    "cross_batch_memory",
    "pair_rows",
    "text_files",
    "window_losses",
]
