"""Long-document QA with llama-index: read a novel once into a persistent FoT memory, answer with sources.

`SimpleDirectoryReader` loads the bundled *Pride and Prejudice*; `FoTMemoryIndex` reads it,
window by window, into an embedded store (a directory: float16 keys and values, hnswlib
indexes, SQLite metadata; no server). Each question then goes to the index's query engine in a
fresh local context, so every fact the answer needs lies in memory, far outside the model's
window; the response's `source_nodes` are the passages that drew the most memory attention.
Answers are shown in the default answer mode (passages: those passages' text placed before the
question, answered from with memory detached), in memory mode (the memory layers attend while
answering), in reread mode (passages placed, memory still attached), and from the plain model
without memory.
Run it twice: the second run finds the novel already stored and answers at once.

    python examples/long_document_qa.py                  # chapters 1-4 (~6,200 tokens; minutes on 2 CPU cores)
    python examples/long_document_qa.py --whole-novel    # all 61 chapters (~168k tokens; hours on a CPU, use --device cuda)
    python examples/long_document_qa.py --document my.txt --question "The treasure is buried under the"
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from llama_index.core import SimpleDirectoryReader
from llama_index.core.llms import ChatMessage

from llama_index.llms.fot_memory import FoTMemoryIndex

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
OPENING = DATA / "pride_and_prejudice_ch1-4.txt"
WHOLE_NOVEL = DATA / "pride_and_prejudice.txt"
# Questions in completion form (like the passkey prompt's "The pass key is"): the zero-shot
# 135M model completes these from memory reliably; chat-style questions (--chat) are brittle.
QUESTIONS = [
    "Netherfield Park is let at last, to a young man named Mr.",
    "The young man who took Netherfield Park is called Mr.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", type=Path, help="a UTF-8 text or markdown file (default: the bundled novel)")
    parser.add_argument("--whole-novel", action="store_true", help="read all of Pride and Prejudice, not chapters 1-4")
    parser.add_argument("--question", action="append", help="ask this (repeatable); default: two questions")
    parser.add_argument("--chat", action="store_true", help="wrap questions in the chat template")
    parser.add_argument("--store", type=Path, default=ROOT / ".cache" / "example-store", help="store directory")
    parser.add_argument("--device", help="cpu (default), cuda, ...")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--no-compare", dest="compare", action="store_false", help="skip the answers without memory")
    args = parser.parse_args(argv)
    path = args.document or (WHOLE_NOVEL if args.whole_novel else OPENING)

    documents = SimpleDirectoryReader(input_files=[path], filename_as_id=True).load_data()
    index = FoTMemoryIndex.from_documents([], args.store, device=args.device)
    with index:
        stored = {record.id for record in index.memory.documents()}
        started = time.perf_counter()
        record = index.insert_documents(documents, show_progress=True)[0]
        seconds = time.perf_counter() - started
        fresh = record.id not in stored
        state = f"read in {seconds:.0f} s ({record.num_tokens / seconds:.0f} tokens/s)" if fresh else "already stored"
        print(f"{record.name}: {record.num_tokens} tokens, {state}; store {args.store}\n")

        engine = index.as_query_engine(memory_docs=[record.name], chat=args.chat,
                                       max_new_tokens=args.max_new_tokens, num_sources=2)  # answer_mode="passages"
        others = {mode: index.as_query_engine(memory_docs=[record.name], chat=args.chat, answer_mode=mode,
                                              max_new_tokens=args.max_new_tokens, num_sources=2)
                  for mode in ("memory", "reread")}
        plain = index.as_llm(memory_docs=[], max_new_tokens=args.max_new_tokens)  # same model, no memory
        for question in args.question or QUESTIONS:
            response = engine.query(question)
            print(f"Q: {question}\nA (passages):  {_line(response.response)}")
            if args.compare:
                for mode, other in others.items():
                    print(f"A ({mode}):{' ' * (10 - len(mode))}{_line(other.query(question).response)}")
                alone = plain.chat([_user(question)]).message.content if args.chat else plain.complete(question).text
                print(f"A (no memory): {_line(alone)}")
            for found in response.source_nodes:
                node = found.node
                share = node.metadata["attention_share"]
                print(f"   source: chars {node.start_char_idx}-{node.end_char_idx}, {share:.1%} of memory attention:")
                print(textwrap.fill(_line(node.get_content()), width=100, initial_indent=" " * 6,
                                    subsequent_indent=" " * 6))  # whole: the reader checks the answer in it
            print()
    return 0


def _line(text: str) -> str:
    return " ".join(text.split())


def _user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


if __name__ == "__main__":
    sys.exit(main())
