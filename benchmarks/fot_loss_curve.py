"""Loss curves of FoT training runs from their log.jsonl files (fot-memory train --out DIR).

    python benchmarks/fot_loss_curve.py benchmarks/results/fot/run1-natural benchmarks/results/fot/run2-recall-paste \
        --out benchmarks/results/fot/loss.png

Plots, per run, the loss of previous windows (local context only) and of current windows (local
context + cross-batch memory), smoothed, with d on a second axis; prints the mean gap
(current - previous) per stretch of training: a memory that helps drives it below zero.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def smooth(values: list[float], span: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - span + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fot_loss.png"))
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    schedule = axis.twinx()
    print("| run | steps | gap current - previous, first third | middle third | last third |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        log = read_log(run)
        steps = [entry["step"] for entry in log]
        for key, style in (("previous_loss", ":"), ("current_loss", "-")):
            axis.plot(steps, smooth([entry[key] for entry in log]), style, label=f"{run.name}: {key.split('_')[0]}")
        schedule.step(steps, [entry["d"] for entry in log], color="grey", alpha=0.4, where="post")
        gaps = [entry["current_loss"] - entry["previous_loss"] for entry in log]
        thirds = [gaps[i * len(gaps) // 3 : (i + 1) * len(gaps) // 3] for i in range(3)]
        print(f"| {run.name} | {steps[-1] + 1} | " + " | ".join(f"{statistics.fmean(t):+.3f}" for t in thirds) + " |")
    axis.set(xlabel="step", ylabel="next-token loss (smoothed)", title="FoT cross-batch training, SmolLM2-135M")
    schedule.set_ylabel("d (documents per memory)", color="grey")
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
