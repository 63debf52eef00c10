"""Planted facts in a real novel: do the cited sources hold the fact, and is the answer right?

Each trial plants one invented fact sentence at a random paragraph boundary of a stretch of a
held-out novel (Persuasion: not in smollm2-fot's training), reads the haystack into a fresh
store, and asks a completion-form cue. For every answer mode x source ranking it reports
whether the fact's chunk is among the top-3 sources, whether the answer contains the fact's
answer (normalised), and the seconds per question; plus two references on the same cues: no
memory (the plain model on the cue alone) and the fact sentence alone before the cue (the
model's ceiling).

    HF_HUB_OFFLINE=1 python benchmarks/needle_sources.py --tokens 4000 --trials 8 \
        --models smollm2 smollm2-fot --out benchmarks/results/needles/needles-4k.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import torch

from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.documents.passages import ANSWER_MODES, RANKINGS

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"

# (fact sentence, verbatim completion cue, paraphrased completion cue, answer): invented, so the
# model cannot know them otherwise. The paraphrase shares the names but not the wording.
FACTS = [
    ("The lighthouse keeper's parrot was called Captain Biscuit.",
     "The lighthouse keeper's parrot was called Captain",
     "The bird that belonged to the man who kept the lighthouse had the name Captain", "Biscuit"),
    ("Mr. Pembury kept his savings in a blue tin marked with the number 4172.",
     "Mr. Pembury kept his savings in a blue tin marked with the number",
     "The number written on the tin where Mr. Pembury hid his money was", "4172"),
    ("The secret ingredient of Mrs. Haddon's plum cake was cardamom.",
     "The secret ingredient of Mrs. Haddon's plum cake was",
     "The spice that Mrs. Haddon never admitted putting in her cake was", "cardamom"),
    ("Lady Thornbury's carriage horse was a grey mare named Juniper.",
     "Lady Thornbury's carriage horse was a grey mare named",
     "The grey mare that pulled Lady Thornbury's carriage answered to the name", "Juniper"),
    ("The old sea captain had sailed as far as Valparaiso in his youth.",
     "The old sea captain had sailed as far as",
     "When he was young, the farthest port the old sea captain reached was", "Valparaiso"),
    ("Miss Arbuthnot's favourite flower was the yellow primrose.",
     "Miss Arbuthnot's favourite flower was the yellow",
     "Of all flowers, the one Miss Arbuthnot loved best was the yellow", "primrose"),
    ("The village clock in Upper Dunsley always ran eleven minutes fast.",
     "The village clock in Upper Dunsley always ran",
     "In Upper Dunsley the clock was never right: it was ahead by", "eleven"),
    ("Colonel Ashby's nephew studied medicine at Edinburgh.",
     "Colonel Ashby's nephew studied medicine at",
     "The city where the Colonel Ashby's nephew trained as a doctor was", "Edinburgh"),
]
CUE_FORMS = ("verbatim", "paraphrase")


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def haystack(book: Path, tokens: int, fact: str, rng: random.Random, tokenizer) -> tuple[str, int]:
    """About `tokens` tokens of the book from a random paragraph, the fact planted at a random
    paragraph boundary inside; returns (text, character offset of the fact)."""
    text = book.read_text(encoding="utf-8")
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    start = rng.randrange(len(paragraphs) // 2)
    chosen, count = [], 0
    for paragraph in paragraphs[start:]:
        chosen.append(paragraph)
        count += len(tokenizer(paragraph, add_special_tokens=False).input_ids) + 1
        if count >= tokens:
            break
    at = rng.randrange(1, max(2, len(chosen) - 1))
    before = "\n\n".join(chosen[:at]) + "\n\n"
    return before + fact + "\n\n" + "\n\n".join(chosen[at:]), len(before)


def run_model(model: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for trial in range(args.trials):
            fact, verbatim, paraphrase, gold = FACTS[trial % len(FACTS)]
            with DocumentMemory.open(Path(scratch) / f"store{trial}", model=model, device=args.device) as memory:
                text, fact_at = haystack(args.books_dir / args.book, args.tokens, fact, rng, memory.engine.tokenizer)
                started = time.perf_counter()
                memory.read_text(text, name=f"haystack{trial}", retrieve=not args.no_retrieval)
                read_s = time.perf_counter() - started
                row = {"trial": trial, "gold": gold, "read_s": round(read_s, 1), "methods": {}}
                for form, cue in zip(CUE_FORMS, (verbatim, paraphrase)):
                    _ask_all(memory, form, cue, fact, fact_at, gold, row, args)
                results.append(row)
                print(json.dumps({"model": model, **row}), flush=True)
    return {"model": model, "rows": results}


def _ask_all(memory: DocumentMemory, form: str, cue: str, fact: str, fact_at: int, gold: str, row: dict,
             args: argparse.Namespace) -> None:
    for mode in ANSWER_MODES:
        for ranking in RANKINGS:
            started = time.perf_counter()
            answer = memory.ask(cue, chat=False, max_new_tokens=args.max_new_tokens, answer_mode=mode,
                                ranking=ranking, num_sources=3, exact=True)
            hit = any(s.start_char <= fact_at + len(fact) and s.end_char >= fact_at + 10
                      for s in answer.sources)
            first = [(s.start_char, s.end_char) for s in answer.sources]
            row["methods"][f"{form}: {mode}/{ranking}"] = {
                "answer": answer.text, "right": normalise(gold) in normalise(answer.text),
                "evidence_top3": hit, "sources": first, "s": round(time.perf_counter() - started, 2)}
    engine = memory.engine
    for name, prompt in (("no memory", cue), ("fact alone", f"{fact}\n\n{cue}")):
        ids = engine.generate(engine.encode(prompt), max_new_tokens=args.max_new_tokens, plain=True)
        said = engine.tokenizer.decode(ids[0], skip_special_tokens=True).strip()
        row["methods"][f"{form}: {name}"] = {"answer": said, "right": normalise(gold) in normalise(said)}


def summary(runs: list[dict]) -> str:
    lines = ["| model | method | answer right | evidence in top-3 sources | s / question |", "|---|---|---|---|---|"]
    for run in runs:
        methods = run["rows"][0]["methods"].keys()
        for method in methods:
            cells = [row["methods"][method] for row in run["rows"]]
            right = sum(cell["right"] for cell in cells)
            hits = sum(cell.get("evidence_top3", False) for cell in cells) if "evidence_top3" in cells[0] else None
            seconds = sum(cell.get("s", 0) for cell in cells) / len(cells) if "s" in cells[0] else None
            lines.append(f"| {run['model']} | {method} | {right}/{len(cells)} | "
                         f"{'' if hits is None else f'{hits}/{len(cells)}'} | "
                         f"{'' if seconds is None else f'{seconds:.1f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--book", default="persuasion.txt")
    parser.add_argument("--books-dir", type=Path, default=BOOKS)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--models", nargs="+", default=["smollm2", "smollm2-fot"])
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--no-retrieval", action="store_true", help="read without retrieval")
    parser.add_argument("--device", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    runs = [run_model(model, args) for model in args.models]
    table = summary(runs)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                        "table": table}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
