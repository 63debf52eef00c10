"""Which layers should hold memory? Induction scores per layer, and copying through memory.

    HF_HUB_OFFLINE=1 python benchmarks/memory_layers.py                      # ~1 min on 2 CPU cores
    HF_HUB_OFFLINE=1 python benchmarks/memory_layers.py --sets 17,18,20,21,23 5,9,13,17,21,25 all

1. Induction score: random tokens repeated twice; for each layer and query head, the attention a
   token of the second copy pays to the token after its first occurrence (plain local attention).
   Layers with high scores hold the heads that find "what came after this last time": the
   skill retrieval from memory needs.
2. Copying through memory, zero-shot: windows of a real book (held out of FoT training) with a
   48-token passage of the previous window pasted into the current one; the loss on the pasted
   tokens (after an 8-token cue) when the previous window is memory (cross-batch attention with
   d = 1, as in training) in the given layers. Lower is better; "none" has no memory.

FoT training only sharpens what these layers already start with: memory in layers 5/9/13/17/21/25
learned no retrieval in 3000 steps, memory in the induction layers 17/18/20/21/23 learned it in
1700 (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fot_memory_plugin.adapters import adapter_for
from fot_memory_plugin.apps.cli import parse_layers
from fot_memory_plugin.models.loading import load_model
from fot_memory_plugin.training.crossbatch import CrossBatchAttention, pair_rows

BOOK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "books" / "persuasion.txt"


def induction_scores(model: torch.nn.Module, repeat: int = 200, rows: int = 4, seed: int = 0) -> torch.Tensor:
    """(layers, heads) mean attention from each second-copy token to the token after its first copy."""
    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(1000, 40000, (rows, repeat), generator=generator)
    ids = torch.cat([first, first], dim=1)
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # the only implementation that returns weights
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
    finally:
        model.config._attn_implementation = implementation
    queries = torch.arange(repeat, 2 * repeat)
    return torch.stack([weights[:, :, queries, queries - repeat + 1].mean(dim=(0, 2)) for weights in attentions])


def pasted_windows(tokenizer, book: Path, docs: int, window: int, span: int, seed: int = 1):
    """(2N, W) batch of [previous; current] windows, each current one holding a passage of its previous one."""
    ids = tokenizer(book.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    generator = torch.Generator().manual_seed(seed)
    stride = (len(ids) - 2 * window) // docs
    previous, current, targets = [], [], []
    for doc in range(docs):
        start = doc * stride
        prev = torch.tensor(ids[start:start + window])
        cur = torch.tensor(ids[start + window:start + 2 * window])
        source, target = (int(torch.randint(0, window - span, (1,), generator=generator)) for _ in range(2))
        cur[target:target + span] = prev[source:source + span]
        previous.append(prev), current.append(cur), targets.append(target)
    return pair_rows(torch.stack(previous), torch.stack(current)), targets


def pasted_loss(model, batch: torch.Tensor, targets: list[int], layers: tuple[int, ...], span: int, cue: int = 8) -> float:
    """Mean loss on the pasted tokens after the cue, with the previous windows as memory in `layers`."""
    adapter = adapter_for(model, layers, CrossBatchAttention(group_size=1)) if layers else None
    if adapter is not None:
        adapter.attach()
    try:
        with torch.no_grad():
            logits = model(input_ids=batch, use_cache=False).logits
    finally:
        if adapter is not None:
            adapter.detach()
    docs = batch.shape[0] // 2
    losses = []
    for doc, target in enumerate(targets):
        positions = torch.arange(target + cue, target + span)
        losses.append(F.cross_entropy(logits[docs + doc, positions - 1], batch[docs + doc, positions]).item())
    return sum(losses) / len(losses)


def parse_set(spec: str, layers: int) -> tuple[int, ...]:
    """"none", or any `--mem-layers` spec ("all", "17,18,20", "0-16", "every3", ...)."""
    if spec == "none":
        return ()
    chosen = parse_layers(spec, layers)
    return tuple(range(layers)) if chosen is None else chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--book", type=Path, default=BOOK)
    parser.add_argument("--sets", nargs="+", default=["none", "all", "5,9,13,17,21,25", "17,18,20,23", "17,18,20,21,23",
                                                     "17,18,20,21,22,23", "0-16", "17-29"])
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/out")) / "memory_layers.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, layers = loaded.model, loaded.model.config.num_hidden_layers

    scores = induction_scores(model)
    print("layer  best induction head  score   (all heads)")
    for layer, row in enumerate(scores):
        print(f"{layer:>5}  {int(row.argmax()):>19}  {row.max():.2f}   {' '.join(f'{s:.2f}' for s in row.tolist())}")

    span = 48
    batch, targets = pasted_windows(loaded.tokenizer, args.book, args.docs, 512, span)
    print("\nmemory layers                  loss on pasted tokens")
    copying = {}
    for spec in args.sets:
        copying[spec] = pasted_loss(model, batch, targets, parse_set(spec, layers), span)
        print(f"{spec:<30} {copying[spec]:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"induction": scores.tolist(), "pasted_loss": copying}, indent=1))


if __name__ == "__main__":
    main()
