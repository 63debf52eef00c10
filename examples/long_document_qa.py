"""Long-document QA: read a document once into a persistent FoT memory, answer questions with sources.

The model (SmolLM2-135M-Instruct by default) reads the document window by window into an
embedded store (a directory: float16 keys and values, hnswlib indexes, SQLite metadata; no
server). Each question is then asked in a fresh local context, so every fact the answer needs
lies in memory, far outside the model's window. Run it twice: the second run finds the
document already stored and answers at once.

    python examples/long_document_qa.py                      # the bundled Pride and Prejudice, ch. 1-4
    python examples/long_document_qa.py --document my.txt --chat --question "Who ...?"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fot_memory_plugin.documents import DocumentMemory

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
# Questions in completion form (like the passkey prompt's "The pass key is"): the zero-shot
# 135M model completes these from memory reliably; chat-style questions (--chat) are brittle.
QUESTIONS = [
    "Netherfield Park is let at last, to a young man named Mr.",
    "The young man who took Netherfield Park is called Mr.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", type=Path, default=BUNDLED, help="a UTF-8 text or markdown file")
    parser.add_argument("--question", action="append", help="ask this (repeatable); default: two questions")
    parser.add_argument("--chat", action="store_true", help="wrap questions in the chat template")
    parser.add_argument("--store", type=Path, default=ROOT / ".cache" / "example-store", help="store directory")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip the answers without memory")
    args = parser.parse_args(argv)

    with DocumentMemory.open(args.store) as memory:
        started = time.perf_counter()
        record, fresh = memory.read_file(args.document, progress=True)
        seconds = time.perf_counter() - started
        state = f"read in {seconds:.0f} s ({record.num_tokens / seconds:.0f} tokens/s)" if fresh else "already stored"
        print(f"{record.name}: {record.num_tokens} tokens, {state}; store {args.store}\n")

        for question in args.question or QUESTIONS:
            print(f"Q: {question}\nA (memory):    ", end="", flush=True)
            answer = memory.ask(
                question, docs=[record.id], chat=args.chat, max_new_tokens=args.max_new_tokens,
                on_text=lambda piece: print(piece.replace("\n", " "), end="", flush=True), num_sources=2,
            )
            print()
            if args.compare:  # the same model with an empty memory
                alone = memory.engine.answer(question, chat=args.chat, max_new_tokens=args.max_new_tokens)
                print("A (no memory): " + alone.replace("\n", " "))
            for source in answer.sources:
                passage = " ".join(source.text.split())
                print(f"   source: chars {source.start_char}-{source.end_char}, "
                      f"{source.weight:.1%} of memory attention: {passage[:160]}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
