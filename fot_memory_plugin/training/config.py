"""The training run's configuration: what the `fot-memory train` command shows as its defaults.

Kept free of torch so that `fot-memory --help` starts in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from ..core.config import MemoryConfig

__all__ = ["TrainConfig", "DEFAULT_MEM_LAYERS"]

# Five of SmolLM2's 30 layers: those that hold its induction heads (benchmarks/memory_layers.py),
# which already copy a little through memory zero-shot, so training has a signal to sharpen.
# Evenly spread layers (5, 9, ..., 25) learned no retrieval at all. 5 of 30 layers cut store
# bytes per token 5.9x against memory in every layer.
DEFAULT_MEM_LAYERS = (17, 18, 20, 21, 23)


@dataclass(frozen=True)
class TrainConfig:
    mem_layers: tuple[int, ...] = DEFAULT_MEM_LAYERS
    window: int = 512  # tokens per window = the local window the model will read with
    batch_docs: int = 16  # N documents per step; 2N windows of `window` tokens
    # (fraction of training, d): d = documents whose previous windows each memory sees. It grows,
    # as in the paper: a few distractors first, more once the keys have learned to stand out.
    group_schedule: tuple[tuple[float, int], ...] = ((0.0, 2), (0.25, 4), (0.5, 8))
    steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    # "memory-attention": only q/k/v/o of the memory layers (a shippable delta); "all": every parameter.
    trainable: Literal["memory-attention", "all"] = "memory-attention"
    # Share of documents per batch whose current window gets a passage of their previous window
    # pasted in (data.py): a recall signal in every batch. 0 trains on the text as it is.
    copy_probability: float = 0.0
    # Share of documents per batch whose current window starts with a question about a fact of
    # their previous window, then its answer (questions.py); the answer tokens get their own loss,
    # weighted by answer_weight and added to the language-model loss. 0 asks nothing.
    question_probability: float = 0.0
    answer_weight: float = 1.0
    gradient_checkpointing: bool = False
    precision: Literal["auto", "bfloat16", "float32"] = "auto"  # auto: bf16 autocast on GPU, float32 on CPU
    seed: int = 0
    checkpoint_every: int = 200  # steps; 0 never
    log_every: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "mem_layers", tuple(sorted(int(layer) for layer in self.mem_layers)))
        object.__setattr__(self, "group_schedule", tuple((float(f), int(d)) for f, d in self.group_schedule))
        if not self.group_schedule or self.group_schedule[0][0] != 0.0:
            raise ValueError("group_schedule must start at fraction 0.0, e.g. ((0.0, 2), (0.5, 8)).")
        for _, group in self.group_schedule:
            if group < 1 or self.batch_docs % group:
                raise ValueError(f"d={group} must divide batch_docs={self.batch_docs}: adjust --group-schedule or --batch-docs.")
        if self.trainable not in ("memory-attention", "all"):
            raise ValueError(f"trainable must be 'memory-attention' or 'all', got {self.trainable!r}.")
        if not 0.0 <= self.question_probability <= 1.0 or self.answer_weight < 0:
            raise ValueError("question_probability must lie in [0, 1] and answer_weight must not be negative.")
        if self.steps < 1 or self.window < 2 or self.batch_docs < 1:
            raise ValueError("steps, window (>= 2) and batch_docs must be positive.")

    def group_size(self, step: int) -> int:
        fraction = step / self.steps
        return [group for start, group in self.group_schedule if start <= fraction][-1]

    def memory_config(self) -> MemoryConfig:
        """How to read and answer with the trained model (`zero` mode: training's memory keys sit at 0)."""
        return MemoryConfig(mem_layers=self.mem_layers, local_window=self.window, positional_mode="zero")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mem_layers"] = list(self.mem_layers)
        data["group_schedule"] = [list(item) for item in self.group_schedule]
        return data
