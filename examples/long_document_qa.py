"""Long-document QA: read a document once into FoT memory, then answer questions about it.

The model (SmolLM2-135M-Instruct by default) reads the document window by window; each question
is then asked in a fresh local context, so every fact the answer needs lies in memory, far
outside the model's local window.

    python examples/long_document_qa.py                      # the bundled Pride and Prejudice, ch. 1-4
    python examples/long_document_qa.py --document my.txt --chat --question "Who ...?"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fot_memory_plugin import MemoryConfig, MemoryEngine, load_model

BUNDLED = Path(__file__).resolve().parent / "data" / "pride_and_prejudice_ch1-4.txt"
# Questions in completion form (like the passkey prompt's "The pass key is"): the zero-shot
# 135M model completes these from memory reliably; chat-style questions (--chat) are brittle.
QUESTIONS = [
    "Netherfield Park is let at last, to a young man named Mr.",
    "The young man who took Netherfield Park is called Mr.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", type=Path, default=BUNDLED, help="a UTF-8 text file")
    parser.add_argument("--question", action="append", help="ask this (repeatable); default: two questions")
    parser.add_argument("--chat", action="store_true", help="wrap questions in the chat template")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a local Hugging Face model path")
    parser.add_argument("--local-window", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip the answers without memory")
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    engine = MemoryEngine(loaded.model, loaded.tokenizer, MemoryConfig(local_window=args.local_window))
    started = time.perf_counter()
    tokens = engine.read(args.document.read_text(encoding="utf-8"), progress=True)
    seconds = time.perf_counter() - started
    windows = -(-tokens // args.local_window)
    print(f"Read {args.document.name}: {tokens} tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s), "
          f"{windows} windows of {args.local_window}.\n")

    for question in args.question or QUESTIONS:
        prompt = engine.chat_prompt(question) if args.chat else engine.encode(question)
        print(f"Q: {question}\nA (memory):    ", end="", flush=True)
        for piece in engine.stream(prompt, max_new_tokens=args.max_new_tokens):
            print(piece.replace("\n", " "), end="", flush=True)
        print()
        if args.compare:
            memories = engine.memories
            engine.reset()  # an empty memory: the model alone
            alone = engine.answer(question, chat=args.chat, max_new_tokens=args.max_new_tokens)
            print(f"A (no memory): {alone}".replace("\n", " "))
            engine.reset(memories)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
