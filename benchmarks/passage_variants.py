"""Which placed text, and generation with or without memory, answers best from cited passages.

On the long-document QA haystacks of one length (benchmarks/_haystacks.py, smollm2-fot read
without retrieval, exact search), each question is ranked once (lift, voting heads, as
`DocumentMemory.ask` ranks), then answered from several selections of cited chunks placed before
it, each generated with memory attached ("-memory") and detached ("-plain", the loaded weights:
this measures placement and memory, not the base-weights swap of `MemoryEngine.base_model`):

- fill: cited chunks best first, as many as fit the local context (re-read before neighbours);
- top3: the three best cited chunks alone;
- top3+1: the three best, each with one chunk either side (what `choose_passages` does, bounded);
- top3+next: the three best, each with the two chunks after it;
- top5+1: the five best with one either side (past the 512-token window: plain only).

Rows go to OUT (jsonl, resumable); the summary prints per variant. benchmarks/README.md,
"Long-document QA", has the ~4k figures:

    HF_HUB_OFFLINE=1 python benchmarks/passage_variants.py 4096 benchmarks/out/variants-4096.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _haystacks as hs  # noqa: E402
import long_doc_qa as ldq  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNBOUNDED = 1 << 30  # a token budget every selection fits


def followed(ranked, chunks_of, top: int, after: int):
    """The `top` best cited chunks, each with the `after` chunks that follow it, every chunk once
    (choose_passages places neighbours symmetrically)."""
    from fot_memory_plugin.documents.passages import Passage

    placed, seen = [], set()
    for item in ranked[:top]:
        chunks, _ = chunks_of(item.doc_id)
        index = item.chunk.index
        group = tuple(c for c in chunks[index: index + after + 1] if (item.doc_id, c.index) not in seen)
        seen.update((item.doc_id, c.index) for c in group)
        placed.append(Passage(item, group))
    return placed


def summary(path: Path) -> str:
    totals = collections.defaultdict(lambda: collections.Counter())
    for row in map(json.loads, path.read_text().splitlines()):
        total = totals[row["variant"]]
        total.update(asked=1, right=row["correct"], question=row["correct"] and row["form"] == "question",
                     placed=row["evidence_placed"], tokens=row["prompt_tokens"])
    return "\n".join(f"{name:16s} right {t['right']}/{t['asked']} (question form {t['question']}), evidence placed "
                     f"{t['placed']}, {t['tokens'] / t['asked']:.0f} prompt tokens" for name, t in sorted(totals.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("length", type=int, help="haystack tokens (4096, 16384, 65536)")
    parser.add_argument("out", type=Path, help="jsonl of per-question rows (a rerun resumes)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--books-dir", type=Path, default=hs.BOOKS_DIR)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "passage_variants")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from fot_memory_plugin.documents import DocumentMemory
    from fot_memory_plugin.documents.passages import choose_passages, passage_text

    spec, cues = hs.load_cues(ROOT / "benchmarks" / "data" / "long_doc_qa.json")
    done = set()
    if args.out.exists():
        done = {(r["cue"], r["form"], r["variant"]) for r in map(json.loads, args.out.read_text().splitlines())}
    with DocumentMemory.open(args.work / str(args.length), model="smollm2-fot", device=args.device) as memory:
        engine = memory.engine
        haystacks = hs.build(spec, cues, args.length, memory._tokenize, books_dir=args.books_dir)
        hs.read_into(memory, haystacks, False)
        ids = {record.name: record.id for record in memory.documents()}
        for haystack, cue, form, chat in ldq._questions(haystacks):
            doc_id = ids[haystack.name]
            evidence = set(hs.evidence_chunks(memory, doc_id, haystack.evidence[cue.id]))
            question = getattr(cue, form)
            records, _, prompt = memory._records_and_prompt(question, [doc_id], chat)
            ranked = memory._passages(records, prompt, chat, True, "lift")
            budget = engine.config.context_length - prompt.shape[1] - args.max_new_tokens
            variants = {
                "fill": choose_passages(ranked, budget, around=0),
                "top3": choose_passages(ranked[:3], UNBOUNDED, around=0),
                "top3+1": choose_passages(ranked[:3], UNBOUNDED, memory._chunks_of, around=1),
                "top3+next": followed(ranked, memory._chunks_of, 3, after=2),
                "top5+1": choose_passages(ranked[:5], UNBOUNDED, memory._chunks_of, around=1),
            }
            for name, placed in variants.items():
                while True:  # "fill" drops its last chunk until the re-encoded prompt fits, as re-read did
                    full = memory._prompt(f"{passage_text(placed, [doc_id])}\n\n{question}", chat)
                    fits = full.shape[1] + args.max_new_tokens <= engine.config.context_length
                    if fits or name != "fill" or len(placed) <= 1:
                        break
                    placed = placed[:-1]
                for attached in (True, False) if fits else (False,):
                    variant = f"{name}-{'memory' if attached else 'plain'}"
                    if (cue.id, form, variant) in done:
                        continue
                    started = time.perf_counter()
                    if attached:
                        with memory._attending(records, True):
                            new = engine.generate(full, max_new_tokens=args.max_new_tokens, **ldq._stop(engine))
                    else:
                        with engine.detached():  # the loaded (FoT) weights, memory unused
                            new = engine.model.generate(input_ids=full, attention_mask=full.new_ones(full.shape),
                                                        max_new_tokens=args.max_new_tokens, do_sample=False,
                                                        pad_token_id=engine._pad_token_id(), **ldq._stop(engine))
                            new = new[:, full.shape[1]:]
                    answer = engine.tokenizer.decode(new[0], skip_special_tokens=True)
                    row = {"cue": cue.id, "form": form, "variant": variant, "answer": hs.first_line(answer),
                           "correct": hs.correct(answer, cue),
                           "evidence_placed": bool({c.index for p in placed for c in p.chunks} & evidence),
                           "prompt_tokens": full.shape[1], "seconds": round(time.perf_counter() - started, 2)}
                    with args.out.open("a", encoding="utf-8") as out:
                        out.write(json.dumps(row) + "\n")
            print(cue.id, form, flush=True)
    print(summary(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
