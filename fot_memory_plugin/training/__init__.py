"""FoT cross-batch training (paper section 3.2): data, the training-time memory layer, the loop.

- `config.py`: `TrainConfig` (no torch: the command line shows its defaults);
- `data.py`: document-aware token streams; `questions.py`: windows that ask about a fact only
  memory holds; `crossbatch.py`: the training-time memory layer;
- `trainer.py`: the loop and checkpoints; `run.py`: `fot-memory train`.
"""

from __future__ import annotations

from .._lazy import lazy_exports

__all__ = [
    "CrossBatchAttention",
    "CrossBatchTrainer",
    "DEFAULT_MEM_LAYERS",
    "QuestionMaker",
    "StepResult",
    "TokenCorpus",
    "TrainConfig",
    "WindowLosses",
    "ask_in_windows",
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
    "WindowLosses": ".trainer",
    "QuestionMaker": ".questions",
    "ask_in_windows": ".questions",
})
