"""Does FoT training help? Passkey accuracy and held-out perplexity vs memory size, side by side.

    python benchmarks/fot_eval.py --delta fot_memory_plugin/deltas/smollm2-fot \
        --book ../shared/data/books/persuasion.txt --tasks passkey perplexity --out benchmarks/out/fot_eval

Variants (one process, same prompts and text for all):
    truncated          base model cut to its local window (no memory)
    zero-shot-all      base model, memory in all 30 layers (the zero-shot default)
    zero-shot-fot      base model, memory only in the delta's layers
    fot                base model + the FoT delta, memory in the delta's layers
Perplexity: the held-out book's last --scored tokens, with 0 .. 64k+ tokens before them in memory.
Writes results.json, table.md and perplexity.png into --out. Bytes per stored token are
proportional to the memory layers (float16 keys + values + hnswlib index per layer and KV head).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.models.delta import read_delta
from fot_memory_plugin.models.loading import load_model
from fot_memory_plugin.apps.passkey import accuracy_table, run_passkey
from fot_memory_plugin.apps.perplexity import memory_perplexity

# Measured store size per token and memory layer for SmolLM2 (3 KV heads x 64 dims): 59.8 KB for
# 30 layers (benchmarks/README.md, Northanger Abbey store) -> ~2.0 KB per layer.
STORE_BYTES_PER_TOKEN_PER_LAYER = 59.8e3 / 30


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="the base model")
    parser.add_argument("--delta", type=Path, required=True, help="a FoT delta directory (fot-memory train)")
    parser.add_argument("--book", type=Path, default=Path("../shared/data/books/persuasion.txt"),
                        help="held-out text for perplexity (never trained on)")
    parser.add_argument("--tasks", nargs="+", default=["passkey", "perplexity"], choices=["passkey", "perplexity"])
    parser.add_argument("--variants", nargs="+", default=["truncated", "zero-shot-all", "zero-shot-fot", "fot"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4000, 16000, 64000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[0, 2048, 8192, 16384, 32768, 65536])
    parser.add_argument("--scored", type=int, default=2048, help="tokens scored at the end of the book")
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/fot_eval"))
    return parser.parse_args()


def engines(args: argparse.Namespace):
    """(variant name, engine, memory layers) for each variant, loading each model once."""
    delta = read_delta(args.delta)
    window = delta.memory_config.local_window
    base = load_model(args.model, device=args.device)
    for name in args.variants:
        if name == "fot":
            continue
        layers = None if name in ("truncated", "zero-shot-all") else delta.memory_config.mem_layers
        config = MemoryConfig(mem_layers=layers, local_window=window, top_k=args.top_k)
        with MemoryEngine(base.model, base.tokenizer, config) as engine:
            yield name, engine
    if "fot" in args.variants:
        tuned = load_model(args.model, device=args.device, delta=args.delta)
        config = tuned.memory_config.replace(top_k=args.top_k)
        with MemoryEngine(tuned.model, tuned.tokenizer, config) as engine:
            yield "fot", engine


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name, engine in engines(args):
        started = time.perf_counter()
        entry = results.setdefault(name, {"mem_layers": len(engine.layers) if name != "truncated" else 0})
        if "passkey" in args.tasks:
            runs = list(run_passkey(engine, args.lengths, args.depths, args.trials, baseline=name == "truncated"))
            table = accuracy_table(r for r in runs if r.memory == (name != "truncated"))
            entry["passkey"] = {}
            for (_, length, _), (correct, total) in sorted(table.items()):
                cell = entry["passkey"].setdefault(str(length), [0, 0])
                cell[0] += correct
                cell[1] += total
        if "perplexity" in args.tasks:
            ids = engine.encode(args.book.read_text(encoding="utf-8"))
            entry["perplexity"] = {
                str(size): memory_perplexity(engine, ids, size, args.scored, truncated=name == "truncated").perplexity
                for size in (args.memory_sizes if name != "truncated" else [0])
            }
        entry["seconds"] = time.perf_counter() - started
        print(name, json.dumps(entry), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    markdown = table_markdown(results, args)
    (args.out / "table.md").write_text(markdown)
    print(markdown)
    if "perplexity" in args.tasks:
        plot(results, args.out / "perplexity.png")


def table_markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    lengths = sorted({length for entry in results.values() for length in entry.get("passkey", {})}, key=int)
    sizes = [str(size) for size in args.memory_sizes]
    header = ["variant", "memory layers", "store KB/token"] + [f"passkey ~{int(l) // 1000}k" for l in lengths]
    header += [f"ppl, {int(s) // 1024}k in memory" for s in sizes]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results.items():
        layers = entry["mem_layers"]
        cells = [name, str(layers), f"{layers * STORE_BYTES_PER_TOKEN_PER_LAYER / 1e3:.1f}" if layers else "-"]
        cells += ["{}/{}".format(*entry["passkey"][l]) if l in entry.get("passkey", {}) else "" for l in lengths]
        perplexity = entry.get("perplexity", {})
        truncated = perplexity.get("0") if name == "truncated" else None
        cells += [f"{perplexity[s]:.2f}" if s in perplexity else (f"{truncated:.2f}" if truncated else "") for s in sizes]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for name, entry in results.items():
        points = sorted((int(size), value) for size, value in entry.get("perplexity", {}).items())
        if name == "truncated" and points:
            axis.axhline(points[0][1], color="grey", linestyle="--", label="truncated (no memory)")
        elif points:
            axis.plot([max(size, 512) for size, _ in points], [value for _, value in points], marker="o", label=name)
    axis.set(xscale="log", xlabel="tokens in memory before the scored text", ylabel="perplexity",
             title="held-out book: last tokens' perplexity vs memory")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
