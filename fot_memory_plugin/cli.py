"""The `fot-memory` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

from .config import MemoryConfig

__all__ = ["main", "build_parser", "parse_layers"]


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...] | None:
    """Layer spec -> indices: "all", "0,5,10", "0-14", "every3" (0, 3, 6, ...), "last15"."""
    spec = spec.strip().lower()
    if spec == "all":
        return None
    if spec.startswith("every"):
        return tuple(range(0, num_layers, int(spec[5:])))
    if spec.startswith("last"):
        return tuple(range(num_layers - int(spec[4:]), num_layers))
    if spec.startswith("first"):
        return tuple(range(int(spec[5:])))
    layers: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            low, high = part.split("-")
            layers.extend(range(int(low), int(high) + 1))
        elif part:
            layers.append(int(part))
    return tuple(layers)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2", help="'smollm2' (default, bundled) or a local model path")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    defaults = MemoryConfig()
    group = parser.add_argument_group("memory")
    group.add_argument("--local-window", type=int, default=defaults.local_window, help="tokens per window")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="memory keys retrieved per query")
    group.add_argument("--mode", choices=["zero", "fixed"], default=defaults.positional_mode, help="positional mode")
    group.add_argument(
        "--mem-layers", default="all", help="memory layers: all | 0,5,10 | 0-14 | every3 | first15 | last15"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fot-memory", description="FoT long-context memory for language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate memory on a benchmark task")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    passkey = tasks.add_parser("passkey", help="passkey retrieval: memory vs the model truncated to its window")
    passkey.add_argument("--lengths", type=int, nargs="+", default=[4000, 16000], help="prompt lengths in tokens")
    passkey.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths in [0, 1]")
    passkey.add_argument("--trials", type=int, default=3, help="trials per length and depth")
    passkey.add_argument("--seed", type=int, default=0)
    passkey.add_argument("--no-baseline", action="store_true", help="skip the truncated-model baseline")
    passkey.add_argument("--json", action="store_true", help="print one JSON object with every result")
    passkey.add_argument("--plot", metavar="FILE.png", help="write a depth x length accuracy heatmap")
    _add_model_options(passkey)
    _add_memory_options(passkey)
    passkey.set_defaults(handler=_eval_passkey)
    return parser


def _engine(args: argparse.Namespace):
    from .engine import MemoryEngine
    from .models import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    layers = parse_layers(args.mem_layers, loaded.model.config.num_hidden_layers)
    config = MemoryConfig(
        mem_layers=layers, local_window=args.local_window, top_k=args.top_k, positional_mode=args.mode
    )
    return MemoryEngine(loaded.model, loaded.tokenizer, config)


def _eval_passkey(args: argparse.Namespace) -> int:
    from .passkey import accuracy_table, plot_heatmap, run_passkey

    engine = _engine(args)
    results = []
    for result in run_passkey(engine, args.lengths, args.depths, args.trials, seed=args.seed, baseline=not args.no_baseline):
        results.append(result)
        if not args.json:
            kind = "memory   " if result.memory else "truncated"
            mark = "ok  " if result.correct else "miss"
            print(f"{kind} {result.length:>7} tok  depth {result.depth:.2f}  {mark} {result.answer.strip()[:30]!r}")
    if args.plot:
        plot_heatmap(results, args.plot, title=f"passkey, window {args.local_window}, mode {args.mode}")
    if args.json:
        print(json.dumps({"results": [result.to_dict() for result in results]}))
    else:
        for (memory, length, depth), (correct, total) in sorted(accuracy_table(results).items()):
            print(f"{'memory' if memory else 'truncated':9} ~{length:>6} tok depth {depth:.2f}: {correct}/{total}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        from .errors import FoTMemoryError

        if isinstance(error, FoTMemoryError) or type(error).__module__.startswith("fot_memory_plugin"):
            print(f"fot-memory: error: {error}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
