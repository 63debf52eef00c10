"""Reading throughput: FoT memory reading vs the plain model forward over the same windows.

For each document length, on real text (a book from ../shared/data), in one process:
  plain      the unpatched decoder over the same windows (no memory at all)
  no-retr.   memory reading, windows append to memory but retrieve nothing
  exact      memory reading with exact top-k retrieval in every memory layer (the default)
and the time per generated token after reading, with memory and without.

    python benchmarks/reading_throughput.py --lengths 2048 4096 8192
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.models.loading import load_model

BOOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "books" / "emma.txt"


def _seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--local-window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--book", type=Path, default=BOOK)
    args = parser.parse_args()

    loaded = load_model()
    engine = MemoryEngine(loaded.model, loaded.tokenizer, MemoryConfig(local_window=args.local_window))
    text = args.book.read_text(encoding="utf-8")
    all_ids = engine.encode(text[: max(args.lengths) * 8])
    prompt = engine.chat_prompt("Who is the main character?")
    engine.read(all_ids[:, : args.local_window])  # warm-up
    print(f"threads: {torch.get_num_threads()}, window {args.local_window}, book {args.book.name}")
    print("| tokens | plain tok/s | no-retrieval tok/s | exact tok/s | exact / plain | ms/token no memory | ms/token memory | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for length in args.lengths:
        ids = all_ids[:, :length]
        plain = _seconds(lambda: _plain_forward(engine, ids))
        engine.reset()
        no_retrieval = _seconds(lambda: engine.read(ids, retrieve=False))
        engine.reset()
        exact = _seconds(lambda: engine.read(ids))
        with_memory = _seconds(lambda: engine.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))
        engine.reset()
        without = _seconds(lambda: engine.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens))
        print(
            f"| {length} | {length / plain:.0f} | {length / no_retrieval:.0f} | {length / exact:.0f} | "
            f"{plain / exact:.2f} | {1000 * without / args.new_tokens:.0f} | {1000 * with_memory / args.new_tokens:.0f} | "
            f"{with_memory / without:.2f} |",
            flush=True,
        )


@torch.no_grad()
def _plain_forward(engine: MemoryEngine, ids: torch.Tensor) -> None:
    with engine.detached() as model:
        for start in range(0, ids.shape[1], engine.config.local_window):
            model.model(input_ids=ids[:, start : start + engine.config.local_window], use_cache=False)


if __name__ == "__main__":
    main()
