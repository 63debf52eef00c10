"""Choose the memory heads that vote for sources (documents/voting_heads.py), QRHead-style.

Calibration cues (benchmarks/data/head_calibration.json) are about four books of smollm2-fot's
training set; the QA benchmark asks about three other books, so no benchmark question, book or
evidence sentence is seen here. The calibration haystacks (~4k tokens each, built like the
benchmark's) are read with and without retrieval; every cue is asked in completion form (raw
prompt) and question form (chat template). A head's score is the share of its memory attention
on the evidence chunks under the question minus under the question-independent probe, averaged
over all of that. The top K heads are kept, K chosen from {4, 8, 16, 32, 64} by how often the
evidence is in the top-3 passages ranked with those heads alone (the calibration set itself).

    HF_HUB_OFFLINE=1 python benchmarks/calibrate_heads.py --model smollm2 smollm2-fot
    # writes fot_memory_plugin/documents/heads/<model>.json (use --out-dir elsewhere)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _haystacks as hs  # noqa: E402

from fot_memory_plugin.documents import DocumentMemory  # noqa: E402
from fot_memory_plugin.documents.voting_heads import HEADS_DIR, VotingHeads, head_scores, select_heads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COUNTS = (4, 8, 16, 32, 64)


def examples(memory: DocumentMemory, haystacks: list[hs.Haystack]) -> tuple[list, list[dict]]:
    """Per (haystack, cue, form): per-head attention per chunk under the question and the probe."""
    names = {record.name: record.id for record in memory.documents()}
    labels, rows = [], []
    for haystack in haystacks:
        doc_id = names[haystack.name]
        for cue in haystack.cues:
            evidence = hs.evidence_chunks(memory, doc_id, haystack.evidence[cue.id])
            for form, chat in (("completion", False), ("question", True)):
                labels, question, probe = memory.head_attention(getattr(cue, form), docs=[doc_id], chat=chat)
                rows.append({"cue": cue.id, "form": form, "question": question[doc_id], "probe": probe[doc_id],
                             "evidence": evidence})
    return labels, rows


def _normalised(attention: np.ndarray) -> np.ndarray:
    totals = attention.sum(axis=1, keepdims=True)
    return np.divide(attention, totals, out=np.zeros_like(attention), where=totals > 0)


def top3_hits(rows: list[dict], chosen: np.ndarray) -> int:
    """How often the evidence is among the top-3 chunks by lift, the chosen heads voting."""
    hits = 0
    for row in rows:
        question, probe = row["question"][chosen].sum(axis=0), row["probe"][chosen].sum(axis=0)
        lift = question / max(question.sum(), 1e-30) - probe / max(probe.sum(), 1e-30)
        hits += bool(set(np.argsort(-lift)[:3].tolist()) & set(row["evidence"]))
    return hits


def calibrate(rows: list[dict], labels: list[tuple[int, int]]) -> tuple[dict, dict]:
    evidence_masks = []
    for row in rows:
        mask = np.zeros(row["question"].shape[1], dtype=bool)
        mask[row["evidence"]] = True
        evidence_masks.append(mask)
    scores = np.stack([head_scores(_normalised(row["question"]), _normalised(row["probe"]), mask)
                       for row, mask in zip(rows, evidence_masks)])
    order = np.argsort(-scores.mean(axis=0))
    every = np.arange(len(labels))
    figures = {"all": top3_hits(rows, every)}
    for count in COUNTS:
        if count < len(labels):
            figures[str(count)] = top3_hits(rows, order[:count])
    best = max((key for key in figures if key != "all"), key=lambda key: (figures[key], int(key)))
    heads = select_heads(scores, labels, int(best))
    return heads, {"examples": len(rows), "top3_hits_by_head_count": figures, "chosen_count": int(best),
                   "mean_score_of_chosen": float(scores.mean(axis=0)[order[: int(best)]].mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["smollm2", "smollm2-fot"])
    parser.add_argument("--cues", type=Path, default=ROOT / "benchmarks" / "data" / "head_calibration.json")
    parser.add_argument("--length", type=int, default=4096, help="haystack tokens")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "calibration")
    parser.add_argument("--out-dir", type=Path, default=HEADS_DIR)
    parser.add_argument("--books-dir", type=Path, default=hs.BOOKS_DIR)
    parser.add_argument("--device", default=None)
    parser.add_argument("--read-modes", nargs="+", default=["retrieve", "no-retrieve"])
    args = parser.parse_args(argv)
    spec, cues = hs.load_cues(args.cues)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for model in args.model:
        rows, labels, started = [], [], time.perf_counter()
        for mode in args.read_modes:
            store = args.work / f"{model}-{mode}-{args.length}"
            with DocumentMemory.open(store, model=model, device=args.device) as memory:
                memory.voting_heads = None
                tokenize = memory._tokenize
                haystacks = hs.build(spec, cues, args.length, tokenize, books_dir=args.books_dir)
                hs.read_into(memory, haystacks, retrieve=(mode == "retrieve"))
                labels, found = examples(memory, haystacks)
                rows += found
                fingerprint = memory.store.fingerprint["model"]
        heads, figures = calibrate(rows, labels)
        figures |= {"cues": str(args.cues.relative_to(ROOT)) if args.cues.is_relative_to(ROOT) else str(args.cues),
                    "haystack_tokens": args.length, "read_modes": args.read_modes,
                    "date": datetime.date.today().isoformat(), "seconds": round(time.perf_counter() - started, 1)}
        profile = VotingHeads(heads, fingerprint["model_id"], fingerprint["config_hash"], figures)
        profile.save(args.out_dir / f"{model}.json")
        print(model, json.dumps(figures), "heads:", {layer: list(h) for layer, h in heads.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
