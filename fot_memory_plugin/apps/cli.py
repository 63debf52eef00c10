"""The `fot-memory` command line.

Only argparse and the configuration modules are imported until a command runs, so `--help`
and `--version` answer at once; every command checks its inputs (files, names, the store)
before the model loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..core.config import MemoryConfig

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


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it has none to show or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every parser and sub-parser of the command shows defaults (sub-parsers take the parser's class)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def _device_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", help="where the model runs: cpu, cuda, cuda:1, mps, ... (default: cpu)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="smollm2",
                       help="'smollm2' (bundled), 'smollm2-fot' (FoT-tuned delta) or a local model path")
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the model's weights and compute (float32 is fastest on a CPU)")
    _device_option(group)


def _add_memory_options(parser: argparse.ArgumentParser) -> None:
    defaults = MemoryConfig()
    group = parser.add_argument_group("memory")
    group.add_argument("--local-window", type=int, default=defaults.local_window, help="tokens per window")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help="memory keys retrieved per query")
    group.add_argument("--mode", choices=["zero", "fixed"], default=defaults.positional_mode, help="positional mode")
    group.add_argument(
        "--mem-layers", help="memory layers: all | 0,5,10 | 0-14 | every3 | first15 | last15 "
        "(default: a FoT-tuned model's own layers, else all)"
    )
    group.add_argument("--retrieval", choices=["exact", "blocks"], default="exact",
                       help="in-RAM retrieval: exact top-k over every key (the reference), or block retrieval "
                            "(the exact top-k inside the best 128 blocks of 32 keys and every window start: "
                            "linear in the input)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fot-memory", description="FoT long-context memory for language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    evaluate = commands.add_parser("eval", help="evaluate memory on a benchmark task")
    tasks = evaluate.add_subparsers(dest="task", required=True)
    passkey = tasks.add_parser("passkey", help="passkey retrieval: memory vs the model truncated to its window")
    passkey.add_argument("--lengths", type=int, nargs="+", default=[4000, 16000], help="prompt lengths in tokens")
    passkey.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9], help="passkey depths in [0, 1]")
    passkey.add_argument("--trials", type=int, default=3, help="trials per length and depth")
    passkey.add_argument("--seed", type=int, default=0, help="seed of the passkeys and filler")
    passkey.add_argument("--no-baseline", action="store_true", help="skip the truncated-model baseline")
    passkey.add_argument(
        "--read-without-retrieval", action="store_true", help="read the prompt into memory without retrieval"
    )
    passkey.add_argument("--json", action="store_true", help="print one JSON object with every result")
    passkey.add_argument("--plot", metavar="FILE.png", help="write a depth x length accuracy heatmap")
    _add_model_options(passkey)
    _add_memory_options(passkey)
    passkey.set_defaults(handler=_eval_passkey)
    perplexity = tasks.add_parser("perplexity", help="a text's last tokens' perplexity vs tokens in memory")
    perplexity.add_argument("text", metavar="PATH", help="a long plain-text file (hold it out of training)")
    perplexity.add_argument("--memory-sizes", type=int, nargs="+", default=[0, 2048, 8192, 32768],
                            help="tokens read into memory before the scored ones")
    perplexity.add_argument("--scored", type=int, default=2048, help="tokens scored at the end of the text")
    perplexity.add_argument("--read-without-retrieval", action="store_true",
                            help="compute the keys entering memory without retrieval (predictions still retrieve)")
    perplexity.add_argument("--json", action="store_true", help="print one JSON object with every result")
    _add_model_options(perplexity)
    _add_memory_options(perplexity)
    perplexity.set_defaults(handler=_eval_perplexity)
    from .store_commands import add_store_commands  # the store's commands: read, ask, docs, ...

    add_store_commands(commands)
    _add_train_command(commands)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    from ..training.config import DEFAULT_MEM_LAYERS, TrainConfig

    defaults = TrainConfig()
    train = commands.add_parser("train", help="FoT cross-batch training; writes a delta for load_model(..., delta=)")
    train.add_argument("data", nargs="*", metavar="PATH", help="text files or directories of them (one file = one document)")
    train.add_argument("--corpus-tokens", metavar="FILE.npz", help="a tokenized corpus from an earlier run, instead of PATHs")
    train.add_argument("--out", required=True, help="run directory: checkpoint, log, delta/ (an existing one resumes)")
    train.add_argument("--hold-out", nargs="*", default=[], metavar="NAME", help="files (name or stem) kept out of training")
    train.add_argument("--model", default="smollm2", help="'smollm2' (default) or a local model path")
    _device_option(train)
    train.add_argument("--mem-layers", default=",".join(map(str, DEFAULT_MEM_LAYERS)), help="memory layers, e.g. 5,9,13")
    train.add_argument("--window", type=int, default=defaults.window, help="tokens per window (the local window)")
    train.add_argument("--batch-docs", type=int, default=defaults.batch_docs, help="documents per step (2 windows each)")
    train.add_argument("--group-schedule", default="2@0,4@0.25,8@0.5",
                       help="d (documents per memory) by fraction of training: d@fraction,...")
    train.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    train.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    train.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps, help="linear warm-up steps")
    train.add_argument("--trainable", choices=["memory-attention", "all"], default=defaults.trainable,
                       help="memory-attention: only the memory layers' q/k/v/o (a small delta); all: every weight")
    train.add_argument("--copy-probability", type=float, default=defaults.copy_probability,
                       help="share of documents whose current window gets a passage of the previous one pasted in")
    train.add_argument("--question-probability", type=float, default=defaults.question_probability,
                       help="share of documents whose current window starts with a question about the previous one")
    train.add_argument("--answer-weight", type=float, default=defaults.answer_weight,
                       help="weight of the answer tokens' loss, added to the language-model loss")
    train.add_argument("--init-delta", metavar="DIR", help="start from this delta (e.g. an earlier run's delta/)")
    train.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations: less memory")
    train.add_argument("--precision", choices=["auto", "bfloat16", "float32"], default=defaults.precision,
                       help="auto: bfloat16 autocast on a GPU, float32 on a CPU")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of sampling and initialisation")
    train.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="steps; 0 never")
    train.add_argument("--time-limit", type=float, help="seconds; stop early with a checkpoint (resume later)")
    train.add_argument("--tokens-cache", help="directory for the tokenized corpus (default: --out)")
    train.add_argument("--compare-plain", type=int, default=0, metavar="STEPS",
                       help="first time this many steps of cross-batch vs plain fine-tuning")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from ..training.run import run_training
    from ..training.config import TrainConfig

    if not args.data and not args.corpus_tokens:
        raise ValueError("Give training text (PATH ...) or --corpus-tokens FILE.npz.")
    for path in [*args.data, *([args.corpus_tokens] if args.corpus_tokens else [])]:  # before the model loads
        if not Path(path).exists():
            raise ValueError(f"{path} does not exist: give text files, directories of them, or a --corpus-tokens file.")
    schedule = tuple((float(fraction), int(group)) for group, fraction in
                     (item.split("@") for item in args.group_schedule.split(",")))
    layers = parse_layers(args.mem_layers, 10**6)
    if layers is None or args.mem_layers.startswith(("every", "last")):
        raise ValueError("fot-memory train needs explicit --mem-layers (e.g. 5,9,13 or 0-29 for all 30 layers).")
    config = TrainConfig(
        mem_layers=layers, window=args.window, batch_docs=args.batch_docs,
        group_schedule=schedule, steps=args.steps, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        trainable=args.trainable, gradient_checkpointing=args.gradient_checkpointing, precision=args.precision,
        seed=args.seed, checkpoint_every=args.checkpoint_every, copy_probability=args.copy_probability,
        question_probability=args.question_probability, answer_weight=args.answer_weight,
    )
    summary = run_training(
        args.data, args.out, config, model=args.model, hold_out=args.hold_out, device=args.device,
        tokens_cache=args.tokens_cache, corpus_tokens=args.corpus_tokens, time_limit=args.time_limit,
        compare_plain_steps=args.compare_plain, init_delta=args.init_delta,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _engine(args: argparse.Namespace):
    from ..core.engine import MemoryEngine
    from ..models.loading import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.mem_layers is None:
        layers = loaded.memory_config.mem_layers if loaded.memory_config is not None else None
    else:
        layers = parse_layers(args.mem_layers, loaded.model.config.num_hidden_layers)
    config = MemoryConfig(
        mem_layers=layers, local_window=args.local_window, top_k=args.top_k, positional_mode=args.mode,
        retrieval=args.retrieval,
    )
    return MemoryEngine(loaded.model, loaded.tokenizer, config, base_weights=loaded.base_weights)


def _eval_passkey(args: argparse.Namespace) -> int:
    from .passkey import accuracy_table, plot_heatmap, run_passkey

    engine = _engine(args)
    results = []
    runs = run_passkey(
        engine, args.lengths, args.depths, args.trials, seed=args.seed, baseline=not args.no_baseline,
        read_retrieval=not args.read_without_retrieval,
    )
    for result in runs:
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


def _eval_perplexity(args: argparse.Namespace) -> int:
    from ..documents.document_memory import load_text
    from .perplexity import memory_perplexity

    text = load_text(args.text)  # before the model loads: a wrong path fails at once
    engine = _engine(args)
    ids = engine.encode(text)
    results = [memory_perplexity(engine, ids, 0, args.scored, truncated=True)]
    results += [memory_perplexity(engine, ids, size, args.scored, read_retrieval=not args.read_without_retrieval)
                for size in args.memory_sizes]
    if args.json:
        print(json.dumps({"results": [result.to_dict() for result in results]}))
        return 0
    for result in results:
        kind = "truncated" if result.truncated else f"{result.memory_tokens:>7} in memory"
        print(f"{kind:>17}: perplexity {result.perplexity:8.2f} over {result.scored_tokens} predictions")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from ..core.errors import FoTMemoryError, StoreError, StoreNotFoundError

    try:
        return args.handler(args)
    except StoreNotFoundError as error:
        print(f"fot-memory: error: No memory store at {error.path} (nothing was created there): `fot-memory read "
              f"FILE --store {error.path}` makes one; check the path, --store and $FOT_MEMORY_STORE.", file=sys.stderr)
        return 2
    except (FoTMemoryError, StoreError, ValueError) as error:
        # Our errors carry a sentence that says what to do; a traceback would only hide it.
        print(f"fot-memory: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file of the user's own (not the store's, which raises StoreError)
        print(f"fot-memory: error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fot-memory: interrupted; nothing half-written is visible in the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
