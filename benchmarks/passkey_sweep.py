"""Passkey accuracy of one model over memory variants (positional mode, memory layers, k).

One process loads the model once and runs every variant on the same prompts (same seed), so the
rows of the table are comparable. Writes results.json, a markdown table and one heatmap per
variant into --out.

    python benchmarks/passkey_sweep.py --lengths 4000 8000 16000 --trials 3 --out benchmarks/out/passkey
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.apps.cli import parse_layers
from fot_memory_plugin.models.loading import load_model
from fot_memory_plugin.apps.passkey import accuracy_table, plot_heatmap, run_passkey

# (name, positional mode, memory layer spec, top_k)
VARIANTS = {
    "all-zero-k128": ("zero", "all", 128),
    "all-fixed-k128": ("fixed", "all", 128),
    "all-zero-k32": ("zero", "all", 32),
    "all-fixed-k32": ("fixed", "all", 32),
    "every2-zero-k128": ("zero", "every2", 128),
    "every2-fixed-k128": ("fixed", "every2", 128),
    "every3-zero-k128": ("zero", "every3", 128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4000, 8000, 16000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--local-window", type=int, default=512)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/passkey"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = load_model(args.model, device=device)
    num_layers = loaded.model.config.num_hidden_layers
    rows, everything = [], {}
    for index, name in enumerate(args.variants):
        mode, layer_spec, top_k = VARIANTS[name]
        config = MemoryConfig(
            mem_layers=parse_layers(layer_spec, num_layers),
            local_window=args.local_window,
            top_k=top_k,
            positional_mode=mode,
        )
        started = time.perf_counter()
        with MemoryEngine(loaded.model, loaded.tokenizer, config) as engine:
            # The truncated baseline does not depend on the variant: run it once.
            results = list(run_passkey(engine, args.lengths, args.depths, args.trials, seed=args.seed, baseline=index == 0))
        seconds = time.perf_counter() - started
        everything[name] = [result.to_dict() for result in results]
        plot_heatmap(results, str(args.out / f"{name}.png"), title=f"passkey: {name}, window {args.local_window}")
        rows.extend(_rows(name, results, seconds))
        print(f"{name}: {seconds:.0f} s", flush=True)
    (args.out / "results.json").write_text(json.dumps(everything, indent=1))
    table = _markdown(rows, args.lengths)
    (args.out / "table.md").write_text(table)
    print(table)


def _rows(name, results, seconds):
    table = accuracy_table(results)
    for memory in sorted({key[0] for key in table}, reverse=True):
        by_length: dict[int, list[int]] = {}
        for (is_memory, length, _), (correct, total) in table.items():
            if is_memory == memory:
                cell = by_length.setdefault(length, [0, 0])
                cell[0] += correct
                cell[1] += total
        yield (name if memory else "truncated to window (no memory)", by_length, seconds if memory else None)


def _markdown(rows, lengths) -> str:
    header = "| variant | " + " | ".join(f"~{length // 1000}k tokens" for length in lengths) + " | seconds |"
    lines = [header, "|" + "---|" * (len(lengths) + 2)]
    for name, by_length, seconds in rows:
        cells = [f"{by_length[key][0]}/{by_length[key][1]}" for key in sorted(by_length)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'' if seconds is None else f'{seconds:.0f}'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
