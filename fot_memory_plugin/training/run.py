"""One training run from files on disk to a delta: what `fot-memory train` does."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.delta import apply_delta, read_delta
from ..models.loading import load_model, model_fingerprint
from .data import TokenCorpus, text_files
from .trainer import CrossBatchTrainer, TrainConfig

__all__ = ["run_training", "measure_throughput"]

logger = logging.getLogger(__name__)

DELTA_DIR = "delta"  # inside the run's output directory, written when the run reaches its last step


def run_training(
    data: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: TrainConfig,
    *,
    model: str = "smollm2",
    hold_out: Sequence[str] = (),
    device: str | None = None,
    tokens_cache: str | os.PathLike[str] | None = None,
    corpus_tokens: str | os.PathLike[str] | None = None,
    until: int | None = None,
    time_limit: float | None = None,
    compare_plain_steps: int = 0,
    progress: bool = True,
    init_delta: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train (or resume) into `out_dir`; write `out_dir/delta` once all steps are done.

    init_delta: start from an earlier delta of the same base (e.g. `smollm2-fot`'s) instead of
    the base weights; the delta written is still against the base model.
    """
    out_dir = Path(out_dir)
    loaded = load_model(model, device=device)
    if corpus_tokens is not None:  # tokenized earlier (TokenCorpus.save), e.g. on another machine
        corpus = TokenCorpus.load(Path(corpus_tokens))
    else:
        files = text_files(data, hold_out)
        corpus = TokenCorpus.from_files(files, loaded.tokenizer, Path(tokens_cache) if tokens_cache else out_dir)
    logger.info("corpus: %d documents, %d tokens", len(corpus), int(corpus.lengths.sum()))
    summary: dict[str, Any] = {"documents": len(corpus), "tokens": int(corpus.lengths.sum()), "held_out": list(hold_out)}
    trainer = CrossBatchTrainer(loaded.model, corpus, config, out_dir, tokenizer=loaded.tokenizer)
    # Cloned before train() resumes from a checkpoint: the delta is always against the base model.
    base_state = {name: parameter.detach().clone() for name, parameter in trainer.parameters.items()}
    if init_delta is not None:
        summary["init_delta"] = _start_from(loaded.model, loaded.model_id, trainer, Path(init_delta))
    with trainer:
        if compare_plain_steps:
            summary["throughput"] = measure_throughput(trainer, compare_plain_steps)
        trainer.train(progress=progress, until=until, time_limit=time_limit)
        summary["steps_done"] = trainer.progress.step
        if trainer.progress.step >= config.steps:
            path = trainer.save_delta(out_dir / DELTA_DIR, base_state, model_fingerprint(loaded.model, loaded.model_id))
            summary["delta"] = str(path)
            summary["delta_bytes"] = sum(file.stat().st_size for file in path.iterdir())
    summary["log_tail"] = trainer.progress.log[-3:]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _start_from(model: torch.nn.Module, model_id: str, trainer: CrossBatchTrainer, path: Path) -> str:
    """Apply an earlier delta whose parameters this run trains; returns its sha256."""
    delta = read_delta(path)
    untrained = sorted(set(delta.tensors) - set(trainer.parameters))
    if untrained or tuple(delta.memory_config.mem_layers) != trainer.config.mem_layers:
        raise ValueError(f"--init-delta {path} changed {untrained[:2] or 'other memory layers'} "
                         f"(memory layers {list(delta.memory_config.mem_layers)}), which this run does not train: "
                         "train the same --mem-layers and --trainable as that delta.")
    apply_delta(model, delta, model_fingerprint(model, model_id)["config_hash"])
    return delta.sha256


def measure_throughput(trainer: CrossBatchTrainer, steps: int) -> dict[str, float]:
    """Tokens/s of cross-batch training vs plain fine-tuning of the same parameters on the same
    batches (adapter detached: every layer plain attention), interleaved step by step.

    Steps use learning rate 0 so measuring does not train.
    """
    timings: dict[str, list[float]] = {"cross_batch": [], "plain": []}
    batch, answers = trainer.batch()
    synchronize = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for index in range(steps + 1):
        for name in timings:
            if name == "plain":
                trainer.adapter.detach()
            try:
                synchronize()
                started = time.perf_counter()
                trainer.step(batch, trainer.config.group_schedule[-1][1], learning_rate=0.0, answers=answers)
                synchronize()
                if index:  # the first round warms up kernels and the allocator
                    timings[name].append(time.perf_counter() - started)
            finally:
                if name == "plain":
                    trainer.adapter.attach()
    trainer.optimizer.state.clear()  # the measuring steps leave no moments behind
    tokens = batch.numel()
    result = {f"{name}_tokens_per_s": tokens * len(times) / sum(times) for name, times in timings.items()}
    result["ratio"] = result["cross_batch_tokens_per_s"] / result["plain_tokens_per_s"]
    result["d"] = trainer.config.group_schedule[-1][1]
    return result

