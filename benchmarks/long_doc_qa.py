"""Long-document QA: FoT memory against standard RAG, the question alone and the evidence alone.

Questions: benchmarks/data/long_doc_qa.json, written before any run: 35 cues over three books
held out of smollm2-fot's training (Persuasion, Northanger Abbey, Pride and Prejudice), 29 facts
from their opening chapters and 6 invented needles, each asked in completion form (raw prompt)
and question form (chat template): 70 questions per length. Haystacks (benchmarks/_haystacks.py):
each book's evidence region at a seeded depth among the other books' text, about 4k, 16k and 64k
tokens; the same haystacks for every method.

Methods
- memory (`--methods memory`): each --model x --read-modes store, answered in each --answer-modes
  (`memory`: generate with memory attached; `passages`: the top passages placed before the
  question, memory detached; `reread`: the same, memory attached); sources ranked by lift with
  the model's calibrated voting heads (default), and, for the evidence figure only, by lift with
  every head and by plain attention share.
- rag (`--methods rag`): llama-index VectorStoreIndex over the same haystacks, MiniLM embeddings,
  SentenceSplitter 200-token chunks, top-3 of the question's haystack; llama-index's default QA
  prompt and the chunks followed by the question; the plain model generates.
- baselines (`--methods baselines`): the question alone, and the evidence paragraph alone before
  the question (the model's ceiling on this question).

Scoring: an answer is right when its normalised first line contains a normalised accepted answer
(whole words); evidence-in-top-3: one of the three cited (memory) or retrieved (RAG) passages
overlaps the evidence span. Each method writes results/<method>.jsonl; `--report` turns every
file there into one table (markdown) and one PNG. A machine with everything installed runs it all
in one command; in practice the memory methods ran on the GPU machine and the others here:

    HF_HUB_OFFLINE=1 python benchmarks/long_doc_qa.py --methods memory --device cuda
    HF_HUB_OFFLINE=1 python benchmarks/long_doc_qa.py --methods rag baselines
    python benchmarks/long_doc_qa.py --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _haystacks as hs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fot_memory_plugin.core.config import ANSWER_MODES  # noqa: E402  (light: no torch)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "long_doc_qa"
FORMS = (("completion", False), ("question", True))  # (form, chat template)
READ_MODES = {"retrieve": True, "no-retrieve": False}
COMPLETION_PROMPT = "{context_str}\n\n{query_str}"


LIMIT: int | None = None  # --limit: the first N questions of each length (a smoke run)
ONLY_FORMS: tuple[str, ...] = ("completion", "question")  # --forms


def _questions(haystacks: list[hs.Haystack]) -> Iterator[tuple[hs.Haystack, hs.Cue, str, bool]]:
    asked = 0
    for haystack in haystacks:
        for cue in haystack.cues:
            for form, chat in FORMS:
                if form not in ONLY_FORMS:
                    continue
                if LIMIT is not None and asked >= LIMIT:
                    return
                asked += 1
                yield haystack, cue, form, chat


def _row(method: str, length: int, cue: hs.Cue, form: str, answer: str, seconds: float,
         top3: bool | None, device: Any = "cpu", **extra: Any) -> dict:
    return {"method": method, "length": length, "cue": cue.id, "kind": cue.kind, "form": form, "device": str(device),
            "answer": hs.first_line(answer), "correct": hs.correct(answer, cue), "seconds": round(seconds, 3),
            "top3": top3, **extra}


REDO_EMPTY = False  # --redo-empty: ask again the questions whose answer came back empty


class Results:
    """Rows appended to results/<name>.jsonl as they come: a rerun resumes where it stopped (the
    report keeps the last row of each question)."""

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{name}.jsonl"
        self.done = {self._key(row) for row in _read(self.path) if not (REDO_EMPTY and row.get("answer") == "")}

    @staticmethod
    def _key(row: dict) -> tuple:
        return row["method"], row["length"], row.get("cue"), row.get("form")

    def has(self, method: str, length: int, cue: str | None = None, form: str | None = None) -> bool:
        return (method, length, cue, form) in self.done

    def add(self, row: dict) -> None:
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")
        self.done.add(self._key(row))


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- memory ---------------------------------------------------------------------------------------


def run_memory(args: argparse.Namespace, spec: dict, cues: list[hs.Cue]) -> None:
    from fot_memory_plugin.documents import DocumentMemory

    for length in args.lengths:  # every configuration at a length before the next length
        for label, model in map(_model_label, args.models):
            for mode in args.read_modes:
                name = f"memory-{label}-{mode}"
                results = Results(args.results, name)
                store = args.work / f"{label}-{mode}-{length}"
                with DocumentMemory.open(store, model=model, device=args.device) as memory:
                    haystacks = hs.build(spec, cues, length, memory._tokenize, books_dir=args.books_dir)
                    seconds = hs.read_into(memory, haystacks, READ_MODES[mode])
                    tokens = sum(record.num_tokens for record in memory.documents())
                    if not results.has(f"{name}-read", length):
                        results.add({"method": f"{name}-read", "length": length, "seconds": round(seconds, 2),
                                     "tokens": tokens, "device": str(memory.engine.device)})
                    _ask_all(memory, haystacks, name, length, results, args)


def _model_label(model: str) -> tuple[str, str]:
    """--models entry -> (its name in the results, what load_model is given): NAME=DELTA_DIR names a
    delta from `fot-memory train`; a bare name names itself."""
    label, _, path = model.partition("=")
    return (label, path) if path else (model, model)


def _ask_all(memory, haystacks: list[hs.Haystack], name: str, length: int, results: Results,
             args: argparse.Namespace) -> None:
    ids = {record.name: record.id for record in memory.documents()}
    calibrated = memory.voting_heads
    for haystack, cue, form, chat in _questions(haystacks):
        todo = [mode for mode in args.answer_modes if not results.has(f"{name}-{mode}", length, cue.id, form)]
        if not todo:
            continue
        doc_id, span = ids[haystack.name], haystack.evidence[cue.id]
        evidence = set(hs.evidence_chunks(memory, doc_id, span))
        suffix = args.question_suffix if form == "question" else ""
        prompt_text = getattr(cue, form) + suffix  # what the memory rows' rankings are computed on
        records, _, prompt = memory._records_and_prompt(prompt_text, [doc_id], chat)
        rankings = {}
        for label, heads, ranking in (("lift+heads", calibrated, "lift"), ("lift", None, "lift")):
            if (label == "lift+heads" and heads is None) or "memory" not in todo:  # the memory rows' figure
                continue
            memory.voting_heads = heads
            ranked = memory._passages(records, prompt, chat, True, ranking)
            rankings[label] = bool({item.chunk.index for item in ranked[:3]} & evidence)
        memory.voting_heads = calibrated
        for answer_mode in todo:
            started = time.perf_counter()
            # --question-suffix replaces the answer mode's own chat instruction (CHAT_ANSWER_INSTRUCTIONS)
            answer = memory.ask(getattr(cue, form), docs=[doc_id], chat=chat, max_new_tokens=args.max_new_tokens,
                                exact=True, answer_mode=answer_mode, instruction=suffix or None,
                                **_stop(memory.engine))
            seconds = time.perf_counter() - started
            top3 = any(hs.overlaps((s.start_char, s.end_char), span) for s in answer.sources[:3])
            results.add(_row(f"{name}-{answer_mode}", length, cue, form, answer.text, seconds, top3,
                             memory.engine.device,
                             rankings=rankings, sources=[[s.start_char, s.end_char] for s in answer.sources[:3]],
                             evidence=list(span)))
        print(f"{name} {length} {cue.id} {form}: {hs.first_line(answer.text)[:40]!r} rankings={rankings}", flush=True)


# -- RAG and the baselines --------------------------------------------------------------------------


def _plain_model(args: argparse.Namespace):
    from fot_memory_plugin import MemoryConfig, MemoryEngine, load_model

    loaded = load_model(args.plain_model, device=args.device)
    return MemoryEngine(loaded.model, loaded.tokenizer, MemoryConfig())


class _FirstLineDone:
    """A stopping criterion: the answer has a non-empty first line and a newline after it (only the
    first line is scored; the rest is drift). A leading newline does not stop it."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.start = tokenizer, None

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.start is None:  # first call: one token generated so far
            self.start = input_ids.shape[1] - 1
        text = self.tokenizer.decode(input_ids[0, self.start:], skip_special_tokens=True).lstrip()
        return torch.tensor([bool(text.strip()) and "\n" in text], device=input_ids.device)


def _stop(engine) -> dict:
    from transformers import StoppingCriteriaList

    return {"stopping_criteria": StoppingCriteriaList([_FirstLineDone(engine.tokenizer)])}


def _plain_answer(engine, text: str, chat: bool, max_new_tokens: int) -> str:
    ids = engine.chat_prompt(text) if chat else engine.encode(text)
    new = engine.generate(ids, max_new_tokens=max_new_tokens, plain=True, **_stop(engine))
    return engine.tokenizer.decode(new[0], skip_special_tokens=True)


def run_rag(args: argparse.Namespace, spec: dict, cues: list[hs.Cue], engine) -> None:
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT_TMPL
    from llama_index.core.schema import MetadataMode
    from llama_index.core.vector_stores import MetadataFilter, MetadataFilters

    from fot_memory_plugin.integrations.llama_index.embeddings import MiniLMEmbedding

    results = Results(args.results, "rag")
    embed = MiniLMEmbedding()
    tokenize = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    Settings.tokenizer = tokenize  # chunks of 200 of the model's tokens (and no tiktoken download)
    for length in args.lengths:
        haystacks = hs.build(spec, cues, length, tokenize, books_dir=args.books_dir)
        started = time.perf_counter()
        documents = [Document(text=h.text, metadata={"haystack": h.name}) for h in haystacks]
        index = VectorStoreIndex.from_documents(documents, embed_model=embed,
                                                transformations=[SentenceSplitter(chunk_size=200, chunk_overlap=20, tokenizer=tokenize)])
        if not results.has("rag-index", length):
            results.add({"method": "rag-index", "length": length, "seconds": round(time.perf_counter() - started, 2),
                         "device": str(engine.device)})
        for haystack, cue, form, chat in _questions(haystacks):
            if results.has("rag-completion", length, cue.id, form):
                continue
            question = getattr(cue, form) + (args.question_suffix if form == "question" else "")
            only = MetadataFilters(filters=[MetadataFilter(key="haystack", value=haystack.name)])
            retriever = index.as_retriever(similarity_top_k=3, filters=only)
            started = time.perf_counter()
            nodes = retriever.retrieve(question)
            retrieval = time.perf_counter() - started
            span = haystack.evidence[cue.id]
            top3 = any(hs.overlaps((n.node.start_char_idx, n.node.end_char_idx), span) for n in nodes)
            context = "\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes)
            for method, template in (("rag-default", DEFAULT_TEXT_QA_PROMPT_TMPL), ("rag-completion", COMPLETION_PROMPT)):
                started = time.perf_counter()
                answer = _plain_answer(engine, template.format(context_str=context, query_str=question), chat,
                                       args.max_new_tokens)
                results.add(_row(method, length, cue, form, answer, retrieval + time.perf_counter() - started, top3,
                                 engine.device,
                                 sources=[[n.node.start_char_idx, n.node.end_char_idx] for n in nodes],
                                 evidence=list(span)))
            print(f"rag {length} {cue.id} {form}: {hs.first_line(answer)[:40]!r} top3={top3}", flush=True)


def run_baselines(args: argparse.Namespace, spec: dict, cues: list[hs.Cue], engine) -> None:
    """The question alone and the evidence paragraph alone: the same at every length."""
    results = Results(args.results, "baselines")
    tokenize = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    haystacks = hs.build(spec, cues, min(args.lengths), tokenize, books_dir=args.books_dir)
    for haystack, cue, form, chat in _questions(haystacks):
        question = getattr(cue, form) + (args.question_suffix if form == "question" else "")
        for method, text in (("none", question),
                             ("evidence-alone", f"{hs.evidence_paragraph(haystack, cue)}\n\n{question}")):
            if results.has(method, 0, cue.id, form):
                continue
            started = time.perf_counter()
            answer = _plain_answer(engine, text, chat, args.max_new_tokens)
            results.add(_row(method, 0, cue, form, answer, time.perf_counter() - started, None, engine.device))
            print(f"baselines {method} {cue.id} {form}: {hs.first_line(answer)[:40]!r}", flush=True)


# -- report ---------------------------------------------------------------------------------------

NAMES = {
    "evidence-alone": "evidence paragraph alone (ceiling)",
    "none": "no memory (question alone)",
    "rag-default": "RAG top-3, llama-index default QA prompt",
    "rag-completion": "RAG top-3, chunks + question",
}


def _label(method: str) -> str:
    if method in NAMES:
        return NAMES[method]
    base, answer_mode = method.rsplit("-", 1)  # memory-<model>-<read mode>-<answer mode>
    for mode, read in (("-no-retrieve", "read without retrieval"), ("-retrieve", "read with retrieval")):
        if base.endswith(mode):
            return f"memory: {base[len('memory-'):-len(mode)]}, {read}, answer {answer_mode}"
    return method


def _one_off(method: str, length: int, setup: dict) -> str:
    """The reading (memory) or indexing (RAG) time behind a method's answers at this length."""
    if method.startswith("memory-"):
        row = setup.get((method.rsplit("-", 1)[0] + "-read", length))
    elif method.startswith("rag-"):
        row = setup.get(("rag-index", length))
    else:
        return "-"
    return f"{row['seconds']:.1f} s ({row['device']})" if row else "-"


def report(folder: Path) -> str:
    rows = [row for path in sorted(folder.glob("*.jsonl")) for row in _read(path)]
    answers = list({Results._key(row): row for row in rows if "cue" in row}.values())  # the last of each
    setup = {(row["method"], row["length"]): row for row in rows if "cue" not in row}
    lengths = sorted({row["length"] for row in answers if row["length"]})
    order = lambda m: (not m.startswith("evidence"), m != "none", not m.startswith("rag"), m)  # noqa: E731
    methods = sorted({row["method"] for row in answers}, key=order)
    lines = []
    for length in lengths:
        lines += [f"\n**~{length // 1024}k tokens**\n",
                  "| method | right: completion | right: question | right: all | evidence in top-3 | s / question | one-off read / index |",
                  "|---|---|---|---|---|---|---|"]
        for method in methods:
            chosen = [r for r in answers if r["method"] == method and r["length"] in (length, 0)]
            if not chosen:
                continue

            def right(form: str | None) -> str:
                part = [r for r in chosen if form is None or r["form"] == form]
                return f"{sum(r['correct'] for r in part)}/{len(part)}"

            tops = [r["top3"] for r in chosen if r["top3"] is not None]
            top = f"{sum(tops)}/{len(tops)}" if tops else "-"
            ranks = [r["rankings"] for r in chosen if r.get("rankings")]
            if ranks and method.endswith("-memory"):  # the question's own pass, each ranking
                labels = [k for k in ranks[0] if all(k in r for r in ranks)]
                top += " (" + ", ".join(f"{k}: {sum(r[k] for r in ranks)}" for k in labels) + ")"
            devices = [r.get("device", "cuda:0") for r in chosen]
            # answers asked again elsewhere keep their first time; a tie goes to the GPU rows
            device = max(sorted(set(devices)), key=lambda d: (devices.count(d), d != "cpu"))
            seconds = statistics.mean(r["seconds"] for r in chosen if r.get("device", "cuda:0") == device)
            lines.append(f"| {_label(method)} | {right('completion')} | {right('question')} | {right(None)} | "
                         f"{top} | {seconds:.2f} | {_one_off(method, length, setup)} |")
    return "\n".join(lines)


def plot(folder: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for path in sorted(folder.glob("*.jsonl")) for row in _read(path) if "cue" in row]
    rows = list({Results._key(row): row for row in rows}.values())
    lengths = sorted({row["length"] for row in rows if row["length"]})
    methods = sorted({row["method"] for row in rows})
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(methods) + 2), sharey=True)
    for axis, (title, field) in zip(axes, (("answer right", "correct"), ("evidence in top-3", "top3"))):
        for offset, length in enumerate(lengths):
            values = []
            for method in methods:
                chosen = [r[field] for r in rows if r["method"] == method and r["length"] in (length, 0)
                          and r[field] is not None]
                values.append(sum(chosen) / len(chosen) if chosen else 0)
            height = 0.8 / len(lengths)
            positions = [i + (offset - (len(lengths) - 1) / 2) * height for i in range(len(methods))]  # centred
            axis.barh(positions, values, height=height, label=f"~{length // 1024}k tokens")
        axis.set_title(title)
        axis.set_xlim(0, 1)
        axis.set_yticks(range(len(methods)), [_label(m) for m in methods], fontsize=8)
        axis.invert_yaxis()
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["baselines", "rag", "memory"],
                        choices=["baselines", "rag", "memory"])
    parser.add_argument("--models", nargs="+", default=["smollm2", "smollm2-fot"],
                        help="model names or paths; NAME=DIR evaluates a delta directory under NAME")
    parser.add_argument("--read-modes", nargs="+", default=list(READ_MODES), choices=list(READ_MODES))
    parser.add_argument("--answer-modes", nargs="+", default=list(ANSWER_MODES), choices=list(ANSWER_MODES),
                        help="the memory methods' answer modes")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 65536])
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per answer; generation stops at the first newline")
    parser.add_argument("--question-suffix", default="",
                        help="appended to question-form questions (for memory, in place of the answer mode's own)")
    parser.add_argument("--plain-model", default="smollm2", help="the model RAG and the baselines use")
    parser.add_argument("--cues", type=Path, default=ROOT / "benchmarks" / "data" / "long_doc_qa.json")
    parser.add_argument("--books-dir", type=Path, default=hs.BOOKS_DIR)
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "out" / "long_doc_qa")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--device", default=None)
    parser.add_argument("--report", action="store_true", help="only print the table and write the PNG")
    parser.add_argument("--books", nargs="*", help="only these books' questions")
    parser.add_argument("--forms", nargs="+", default=["completion", "question"], choices=["completion", "question"])
    parser.add_argument("--redo-empty", action="store_true", help="ask again questions whose answer came back empty")
    parser.add_argument("--limit", type=int, help="only the first N questions per length (a smoke run)")
    args = parser.parse_args(argv)
    global LIMIT, ONLY_FORMS, REDO_EMPTY
    LIMIT, ONLY_FORMS, REDO_EMPTY = args.limit, tuple(args.forms), args.redo_empty
    if not args.report:
        spec, cues = hs.load_cues(args.cues)
        if args.books:
            spec["books"] = {book: spec["books"][book] for book in args.books}
            cues = [cue for cue in cues if cue.book in args.books]
        engine = _plain_model(args) if {"rag", "baselines"} & set(args.methods) else None
        if "baselines" in args.methods:
            run_baselines(args, spec, cues, engine)
        if "rag" in args.methods:
            run_rag(args, spec, cues, engine)
        if "memory" in args.methods:
            run_memory(args, spec, cues)
    table = report(args.results)
    print(table)
    (args.results / "table.md").write_text(table + "\n", encoding="utf-8")
    plot(args.results, args.results / "long_doc_qa.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
