"""Completion cues asked of stored documents through each search path, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/store_cues.py STORE [STORE ...] \
        --questions benchmarks/results/novel/pp_questions.json [--json OUT.json]

Each STORE (for example the same novel indexed with hnswlib and with clusters, `fot-memory
reindex --index`) is opened in this process and asked every question (a JSON list of [cue,
expected answer]) as `fot-memory ask --no-chat --max-new-tokens 6 --sources 2` asks it: through
the store's indexes, and once with exact search (every stored key). An answer is right when it
contains the expected word (case-insensitive); the first source is right when its text does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.persistence.store import index_kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", type=Path, nargs="+")
    parser.add_argument("--questions", type=Path, default=Path("benchmarks/results/novel/pp_questions.json"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    questions = json.loads(args.questions.read_text(encoding="utf-8"))
    rows, answers = [], []
    for path in args.stores:
        with DocumentMemory.open(path, readonly=True) as memory:
            kinds = "+".join(sorted({index_kind(record) for record in memory.store.documents()}))
            for exact in (False, True):
                right = cited = 0
                started = time.perf_counter()
                for cue, expected in questions:
                    answer = memory.ask(cue, chat=False, max_new_tokens=6, num_sources=2, exact=exact)
                    ok = expected in answer.text.lower()
                    first = bool(answer.sources) and expected in answer.sources[0].text.lower()
                    right, cited = right + ok, cited + first
                    answers.append({"store": str(path), "index": kinds, "exact": exact, "cue": cue, "answer": answer.text,
                                    "ok": ok, "first_source_ok": first,
                                    "first_source": [answer.sources[0].start_char, answer.sources[0].end_char]
                                    if answer.sources else None})
                seconds = (time.perf_counter() - started) / len(questions)
                rows.append([path.name, "exact scan" if exact else kinds, f"{right}/{len(questions)}",
                             f"{cited}/{len(questions)}", f"{seconds:.1f}"])
                print(rows[-1], flush=True)
    header = ["store", "search", "answers right", "first source holds the answer", "s / question"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    if args.json:
        args.json.write_text("\n".join(json.dumps(item) for item in answers) + "\n", encoding="utf-8")


if __name__ == "__main__":
    with torch.no_grad():
        main()
