"""Passkey retrieval (landmark attention / LongLLaMA prompt): can the model find a number hidden
at some depth of a long filler text?

Memory runs read everything but the prompt's last `last_context_length` tokens into memory and
answer from the tail; the baseline is the same model given only the last `local_window` tokens.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from ..core.engine import MemoryEngine

__all__ = ["PasskeyResult", "passkey_prompt", "prompt_of_length", "is_correct", "run_passkey", "accuracy_table",
           "plot_heatmap", "heatmap_figure"]

logger = logging.getLogger(__name__)

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_PASSKEY = 50000


@dataclass(frozen=True)
class PasskeyResult:
    length: int  # tokens in the prompt
    depth: float  # where the passkey sits in the filler, 0 = start, 1 = end
    trial: int
    memory: bool  # True: read into memory; False: truncated to the last local_window tokens
    correct: bool
    answer: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def passkey_prompt(filler_chars: int, depth: float, passkey: int) -> str:
    """The prompt with `filler_chars` characters of filler, the passkey line at `depth` of it."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}.")
    repeats = filler_chars // len(FILLER) + 2
    filler = " ".join([FILLER] * repeats)[:filler_chars]
    split = int(filler_chars * depth)
    info = f"The pass key is {passkey}. Remember it. {passkey} is the pass key."
    return "\n".join([TASK, filler[:split], info, filler[split:], QUESTION])


def prompt_of_length(tokenizer: Any, tokens: int, depth: float, passkey: int) -> str:
    """A passkey prompt of about `tokens` tokens (filler counted in characters, scaled to fit)."""
    chars = tokens * 4
    for _ in range(4):  # the filler's characters-per-token ratio is stable: converges in 2-3 steps
        count = len(tokenizer(passkey_prompt(chars, depth, passkey), add_special_tokens=False).input_ids)
        if abs(count - tokens) <= max(8, tokens // 200):
            break
        chars = max(len(FILLER), int(chars * tokens / count))
    return passkey_prompt(chars, depth, passkey)


def is_correct(answer: str, passkey: int) -> bool:
    """True when the number that opens the answer is the passkey."""
    match = re.match(r"\s*(\d+)", answer)
    return match is not None and int(match.group(1)) == passkey


def _answer(
    engine: MemoryEngine, prompt_ids: torch.Tensor, memory: bool, max_new_tokens: int, read_retrieval: bool = True
) -> str:
    if memory:
        engine.reset()
        keep = engine.config.context_length
        if prompt_ids.shape[1] > keep:  # the prompt's head goes to memory, as generate() would do
            engine.read(prompt_ids[:, :-keep], retrieve=read_retrieval)
        new_ids = engine.generate(prompt_ids[:, -keep:], max_new_tokens=max_new_tokens)
    else:
        with engine.detached() as model:
            tail = prompt_ids[:, -engine.config.local_window :].to(engine.device)
            output = model.generate(
                input_ids=tail,
                attention_mask=torch.ones_like(tail),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=engine.tokenizer.eos_token_id,
            )
            new_ids = output[:, tail.shape[1] :]
    engine.reset()
    return engine.tokenizer.decode(new_ids[0], skip_special_tokens=True)


def run_passkey(
    engine: MemoryEngine,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    *,
    seed: int = 0,
    baseline: bool = True,
    max_new_tokens: int = 8,
    read_retrieval: bool = True,
) -> Iterator[PasskeyResult]:
    """Yield one result per (length, depth, trial) for memory, and for the truncated baseline.

    read_retrieval=False reads the prompt into memory without retrieval (faster, and worse).
    """
    rng = random.Random(seed)
    for length in lengths:
        for depth in depths:
            for trial in range(trials):
                passkey = rng.randint(1, MAX_PASSKEY)
                prompt = prompt_of_length(engine.tokenizer, length, depth, passkey)
                ids = engine.encode(prompt)
                for memory in (True, False) if baseline else (True,):
                    answer = _answer(engine, ids, memory, max_new_tokens, read_retrieval)
                    result = PasskeyResult(ids.shape[1], depth, trial, memory, is_correct(answer, passkey), answer)
                    logger.info("passkey %s: %s", passkey, result)
                    yield result


def accuracy_table(results: Iterable[PasskeyResult | dict]) -> dict[tuple[bool, int, float], tuple[int, int]]:
    """{(memory, nominal length bucket, depth): (correct, total)}; lengths bucketed to 3 significant digits."""
    table: dict[tuple[bool, int, float], tuple[int, int]] = {}
    for result in results:
        row = result if isinstance(result, dict) else result.to_dict()
        key = (row["memory"], _bucket(row["length"]), row["depth"])
        correct, total = table.get(key, (0, 0))
        table[key] = (correct + int(row["correct"]), total + 1)
    return table


def _bucket(length: int) -> int:
    digits = len(str(length)) - 2
    return round(length, -digits) if digits > 0 else length


def plot_heatmap(results: Sequence[PasskeyResult | dict], path: str, title: str = "passkey accuracy") -> None:
    """Depth x length heatmaps of accuracy, memory beside truncated, saved as a PNG."""
    import matplotlib.pyplot as plt

    figure = heatmap_figure(results, title)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def heatmap_figure(results: Sequence[PasskeyResult | dict], title: str = "passkey accuracy") -> Any:
    """The matplotlib Figure that plot_heatmap saves (one panel per variant, one colour bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = accuracy_table(results)
    lengths = sorted({key[1] for key in table})
    depths = sorted({key[2] for key in table})
    variants = sorted({key[0] for key in table}, reverse=True)
    # Constrained layout keeps the suptitle, panel titles, labels and colour bar apart; the panels
    # share the depth axis, so only the first carries its label.
    figure, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants) + 1.4, 3.6), squeeze=False,
                                sharey=True, layout="constrained")
    for axis, memory in zip(axes[0], variants):
        grid = [[_share(table.get((memory, length, depth))) for length in lengths] for depth in depths]
        image = axis.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        axis.set_xticks(range(len(lengths)), [f"{length // 1000}k" if length >= 1000 else str(length) for length in lengths])
        axis.set_yticks(range(len(depths)), [f"{depth:.2f}" for depth in depths])
        axis.set_xlabel("prompt tokens")
        axis.set_title("FoT memory" if memory else "truncated to window", fontsize=10)
        for row, depth in enumerate(depths):
            for column, length in enumerate(lengths):
                correct, total = table.get((memory, length, depth), (0, 0))
                share = _share((correct, total))
                dark = share == share and (share < 0.2 or share > 0.8)  # NaN: an empty cell
                axis.text(column, row, f"{correct}/{total}", ha="center", va="center", fontsize=8,
                          color="white" if dark else "black")
    axes[0][0].set_ylabel("passkey depth")
    figure.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.9)
    figure.suptitle(title, fontsize=11)
    return figure


def _share(cell: tuple[int, int] | None) -> float:
    return float("nan") if not cell or not cell[1] else cell[0] / cell[1]
