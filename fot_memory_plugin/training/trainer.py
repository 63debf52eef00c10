"""FoT cross-batch training: a recipe you can read top to bottom.

Each step draws N documents, two consecutive windows from each, stacks them as
[previous windows ; current windows] (crossbatch.py) and minimises the plain language-model loss
of every window, plus, where some current windows start with a question about their previous
window (questions.py), the loss of the answers. Memory layers route their attention through `CrossBatchAttention`, so a current
window attends to the previous windows of d documents of the batch (its own and d-1 negatives);
d follows a schedule that grows during training. Only the memory layers' attention is trained by
default: the result is a delta of a few MB (models/delta.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import adapter_for, num_layers
from ..core.config import MemoryConfig
from ..models.delta import save_delta
from .config import DEFAULT_MEM_LAYERS, TrainConfig
from .crossbatch import CrossBatchAttention, pair_rows
from .data import TokenCorpus
from .questions import QuestionMaker, ask_in_windows

__all__ = ["TrainConfig", "CrossBatchTrainer", "StepResult", "WindowLosses", "window_losses", "DEFAULT_MEM_LAYERS"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"


@dataclass
class StepResult:
    loss: float  # mean over all windows
    previous_loss: float  # previous windows: local context only
    current_loss: float  # current windows: local context + cross-batch memory
    answer_loss: float | None  # answer tokens of the questions asked (None: none asked)
    group_size: int
    tokens: int


@dataclass
class _Progress:
    step: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


class CrossBatchTrainer:
    """Trains `model` in place. Use as a context manager (attaches and detaches the adapter)."""

    def __init__(self, model: torch.nn.Module, corpus: TokenCorpus, config: TrainConfig,
                 out_dir: str | os.PathLike[str] | None = None, tokenizer: Any = None) -> None:
        self.model, self.corpus, self.config = model, corpus, config
        if config.question_probability and tokenizer is None:
            raise ValueError("Asking questions in training windows needs the model's tokenizer: pass tokenizer=.")
        self.questions = QuestionMaker(tokenizer) if config.question_probability else None
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = next(model.parameters()).device
        config.memory_config().layers_for(num_layers(model))  # layers exist
        self.handler = CrossBatchAttention()
        self.adapter = adapter_for(model, config.mem_layers, self.handler)
        self.parameters = self._trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.parameters.values(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay, betas=(0.9, 0.95))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.progress = _Progress()
        self.autocast = _autocast(config.precision, self.device)

    def __enter__(self) -> CrossBatchTrainer:
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(name in self.parameters)
        if self.config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        self.adapter.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.adapter.attached:
            self.adapter.detach()
        if self.config.gradient_checkpointing:
            self.model.gradient_checkpointing_disable()
        self.model.eval()

    def _trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        named = dict(self.model.named_parameters())
        if self.config.trainable == "all":
            return named
        attention = [module for layer, module in enumerate(self.adapter.decoder.layers) if layer in self.config.mem_layers]
        wanted = {id(p) for module in attention for p in module.self_attn.parameters()}
        return {name: p for name, p in named.items() if id(p) in wanted}

    # -- one step -----------------------------------------------------------------------------

    def learning_rate(self, step: int) -> float:
        """Linear warm-up, then cosine decay to a tenth."""
        config = self.config
        if step < config.warmup_steps:
            return config.learning_rate * (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the (2N, W) token ids; the (2N, W) mask of answer tokens, None when nothing is asked)."""
        config = self.config
        previous, current = self.corpus.sample_windows(config.batch_docs, config.window, self.generator,
                                                       config.copy_probability)
        answers = None
        if self.questions is not None:
            asked = ask_in_windows(self.questions, previous, current, config.question_probability, self.generator)
            answers = pair_rows(torch.zeros_like(asked), asked).to(self.device)
        return pair_rows(previous, current).to(self.device), answers  # (2N, W)

    def step(self, batch: torch.Tensor, group_size: int, learning_rate: float | None = None,
             answers: torch.Tensor | None = None) -> StepResult:
        """One optimiser step on a (2N, W) batch with d = group_size (answers: batch()'s mask)."""
        self.handler.group_size = group_size
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate if learning_rate is not None else self.config.learning_rate
        with self.autocast:
            losses = window_losses(self.model, batch, answers)
            loss = (losses.previous + losses.current) / 2
            if losses.answer is not None:
                loss = loss + self.config.answer_weight * losses.answer
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters.values(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        answer = losses.answer.item() if losses.answer is not None else None
        return StepResult(loss.item(), losses.previous.item(), losses.current.item(), answer, group_size,
                          batch.numel())

    # -- the loop -----------------------------------------------------------------------------

    def train(self, progress: bool = True, until: int | None = None, time_limit: float | None = None
              ) -> list[dict[str, Any]]:
        """Run (or resume) to config.steps; returns the log (one entry per `log_every` steps).

        `until` (a step) or `time_limit` (seconds) stop early with a checkpoint, to continue in a
        later run (a machine lent for minutes at a time); the schedule still spans config.steps.
        """
        self.resume()
        config = self.config
        stop = min(config.steps, until if until is not None else config.steps)
        bar = tqdm(total=config.steps, initial=self.progress.step, desc="FoT training", unit="step", disable=not progress)
        tokens, started = 0, time.perf_counter()
        while self.progress.step < stop:
            if time_limit is not None and time.perf_counter() - started > time_limit:
                break
            step = self.progress.step
            batch, answers = self.batch()
            result = self.step(batch, config.group_size(step), self.learning_rate(step), answers)
            self.progress.step += 1
            tokens += result.tokens
            rate = tokens / (time.perf_counter() - started)
            shown = {"answer": f"{result.answer_loss:.3f}"} if result.answer_loss is not None else {}
            bar.set_postfix(loss=f"{result.loss:.3f}", mem=f"{result.current_loss:.3f}", **shown, d=result.group_size,
                            tok_s=f"{rate:,.0f}")
            bar.update(1)
            if step % config.log_every == 0 or self.progress.step == stop:
                self._log(step, result, rate)
            if config.checkpoint_every and self.progress.step % config.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if config.checkpoint_every:
            self.save_checkpoint()
        return self.progress.log

    def _log(self, step: int, result: StepResult, tokens_per_second: float) -> None:
        entry = {"step": step, "loss": result.loss, "previous_loss": result.previous_loss,
                 "current_loss": result.current_loss, "answer_loss": result.answer_loss, "d": result.group_size,
                 "tokens_per_s": tokens_per_second}
        self.progress.log.append(entry)
        logger.info("step %d: %s", step, entry)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")

    # -- checkpoints and the delta --------------------------------------------------------------

    def save_checkpoint(self) -> Path | None:
        """Trainable parameters, optimiser, step and sampler state; written atomically."""
        if self.out_dir is None:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config.to_dict(),
            "step": self.progress.step,
            "log": self.progress.log,
            "parameters": {name: p.detach().cpu() for name, p in self.parameters.items()},
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }
        path = self.out_dir / CHECKPOINT_FILE
        temporary = path.with_name(f".{path.name}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)
        return path

    def resume(self) -> bool:
        """Continue from out_dir's checkpoint if there is one; refuse one from another config."""
        path = self.out_dir / CHECKPOINT_FILE if self.out_dir is not None else None
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = {key: value for key, value in state["config"].items() if key not in ("steps", "checkpoint_every", "log_every")}
        mine = {key: value for key, value in self.config.to_dict().items() if key in saved}
        if saved != mine:
            changed = sorted(key for key in saved if saved[key] != mine.get(key))
            raise ValueError(f"{path} was trained with other settings ({', '.join(changed)}): "
                             "use another --out directory, or the same settings to resume.")
        with torch.no_grad():
            for name, value in state["parameters"].items():
                self.parameters[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.progress = _Progress(step=state["step"], log=state["log"])
        logger.info("resumed from %s at step %d", path, self.progress.step)
        return True

    def save_delta(self, path: str | os.PathLike[str], base_state: dict[str, torch.Tensor],
                   base_fingerprint: dict[str, Any]) -> Path:
        summary = {"config": self.config.to_dict(), "steps_done": self.progress.step,
                   "final": self.progress.log[-1] if self.progress.log else None}
        return save_delta(path, {name: p for name, p in self.parameters.items()}, base_state,
                          self.config.memory_config(), base_fingerprint, summary)


class WindowLosses(NamedTuple):
    previous: torch.Tensor  # mean next-token loss of the previous windows
    current: torch.Tensor  # of the current windows
    answer: torch.Tensor | None  # of the answer tokens alone (None: no answer mask, or nothing asked)


def window_losses(model: torch.nn.Module, batch: torch.Tensor, answers: torch.Tensor | None = None) -> WindowLosses:
    """Next-token losses of the (2N, W) batch; `answers` (2N, W) marks the tokens to score as answers."""
    logits = model(input_ids=batch, use_cache=False).logits  # (2N, W, V)
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
    losses = losses.view(batch.shape[0], -1)
    docs = batch.shape[0] // 2
    answer = None
    if answers is not None and bool(answers[:, 1:].any()):
        answer = losses[answers[:, 1:]].mean()  # the loss of predicting each answer token
    return WindowLosses(losses[:docs].mean(), losses[docs:].mean(), answer)


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "float32" or (precision == "auto" and device.type == "cpu"):
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)
