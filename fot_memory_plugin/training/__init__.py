"""FoT cross-batch training (paper section 3.2): data, the training-time memory layer, the loop.

- `config.py`: `TrainConfig` (no torch: the command line shows its defaults);
- `data.py`: document-aware token streams; `crossbatch.py`: the training-time memory layer;
- `trainer.py`: the loop and checkpoints; `run.py`: `fot-memory train`.
"""

from __future__ import annotations

from .._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, {
    "CrossBatchAttention": ".crossbatch",
    "cross_batch_memory": ".crossbatch",
    "pair_rows": ".crossbatch",
    "TokenCorpus": ".data",
    "text_files": ".data",
    "DEFAULT_MEM_LAYERS": ".config",
    "TrainConfig": ".config",
    "CrossBatchTrainer": ".trainer",
    "StepResult": ".trainer",
    "window_losses": ".trainer",
})
