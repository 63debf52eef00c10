"""Persistent FoT memory with llama-index: read in one process, ask in another.

`read` loads files with `SimpleDirectoryReader` and reads them into a store; `ask` is a new
process that reopens the store with `FoTMemoryIndex.from_persist_dir` (the model and memory
config come from what the store recorded) and answers from memory with source passages, the
documents' llama-index ids and metadata coming back from the store's SQLite database.
Without a command it runs `read` and then `ask`, each as its own process.

    python examples/persistent_memory.py                                   # both, on the bundled novel's opening
    python examples/persistent_memory.py read my.txt notes.md --store DIR
    python examples/persistent_memory.py ask "The treasure is buried under the" --store DIR
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
QUESTION = "Netherfield Park is let at last, to a young man named Mr."


def read(files: list[Path], store: Path) -> None:
    from llama_index.core import SimpleDirectoryReader

    from llama_index.llms.fot_memory import FoTMemoryIndex

    documents = SimpleDirectoryReader(input_files=files, filename_as_id=True).load_data()
    started = time.perf_counter()
    with FoTMemoryIndex.from_documents(documents, store, show_progress=True) as index:
        print(f"[read, pid {os.getpid()}] {len(documents)} document(s) in {time.perf_counter() - started:.0f} s; "
              f"store {index.persist_dir} holds:")
        for ref_doc_id, record in index.ref_docs.items():
            print(f"   {record.name}: {record.num_tokens} tokens, llama-index id {ref_doc_id}")


def ask(questions: list[str], store: Path, max_new_tokens: int) -> None:
    from llama_index.llms.fot_memory import FoTMemoryIndex

    with FoTMemoryIndex.from_persist_dir(store, readonly=True) as index:
        engine = index.as_query_engine(max_new_tokens=max_new_tokens, num_sources=2)
        print(f"[ask, pid {os.getpid()}] reopened {index.persist_dir}: "
              f"{', '.join(record.name for record in index.memory.documents())}")
        for question in questions:
            response = engine.query(question)
            print(f"Q: {question}\nA: {' '.join(response.response.split())}")
            for found in response.source_nodes:
                node = found.node
                print(f"   source: {node.metadata['file_name']} (id {node.ref_doc_id}), "
                      f"chars {node.start_char_idx}-{node.end_char_idx}, score {found.score:.3f}: "
                      f"{' '.join(node.get_content().split())[:120]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / ".cache" / "persistent-example-store")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    commands = parser.add_subparsers(dest="command")
    reading = commands.add_parser("read", help="read files into the store")
    reading.add_argument("files", nargs="+", type=Path)
    asking = commands.add_parser("ask", help="answer questions from the store (a new process)")
    asking.add_argument("questions", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "read":
        read(args.files, args.store)
    elif args.command == "ask":
        ask(args.questions, args.store, args.max_new_tokens)
    else:  # the demo: two separate processes
        common = [sys.executable, __file__, "--store", str(args.store), "--max-new-tokens", str(args.max_new_tokens)]
        subprocess.run([*common, "read", str(DOCUMENT)], check=True)
        subprocess.run([*common, "ask", QUESTION], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
