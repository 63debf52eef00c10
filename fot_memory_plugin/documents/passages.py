"""Which stored passages a question draws memory attention to, and how they re-enter the prompt.

Sources are text chunks scored by the share of memory attention their tokens receive. A chunk is
a run of whole sentences of at most CHUNK_TOKENS tokens (llama-index's SentenceSplitter picks the
cuts; a longer sentence is cut between words), so a cited passage reads as prose. Some chunks draw attention whatever is asked (a document's opening, formatting
runs: attention sinks), so the ranking can subtract what a question-independent probe gives each
chunk: `lift = share under the question - share under the probe`.

Re-read answering puts the best-ranked chunks' text, each with a neighbouring chunk either side,
into the local context ahead of the question, the best passage last (nearest the question, where a
small model reads most closely): memory attention chooses the evidence, and the model reads it
verbatim instead of through a few retrieved keys per layer.
`answer_mode="passages"` then generates with memory detached (the answer comes from the placed
text alone), `"reread"` with memory still attached.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
import numpy as np
import torch

from ..core.config import ANSWER_MODES, RANKINGS, AnswerMode, Ranking
from ..persistence import Chunk

__all__ = ["CHUNK_TOKENS", "sentence_chunks", "ScoredChunk", "AnswerMode", "Ranking", "ANSWER_MODES", "RANKINGS", "BASELINE_PROBE",
           "chunk_shares", "chunk_sums", "rank_chunks", "choose_passages", "placed_runs", "passage_text", "Passage", "CONTEXT_CHUNKS"]

CHUNK_TOKENS = 64  # at most, per cited passage: a sentence or two of prose
# Chunks placed either side of each cited chunk when its text re-enters the prompt: the answer
# often sits in the sentence after the one the question paraphrases (benchmarks/README.md).
CONTEXT_CHUNKS = 1

# A question about nothing in particular: the attention it pays is the question-independent part.
BASELINE_PROBE = "Here is a question about the text."


@dataclass(frozen=True)
class ScoredChunk:
    doc_id: str
    chunk: Chunk
    share: float  # of the memory attention paid to all chunks, under the question
    lift: float  # share minus the share under BASELINE_PROBE


ChunksOf = Callable[[str], tuple[list[Chunk], np.ndarray]]  # doc id -> (chunks, their start tokens)


def sentence_chunks(text: str, offsets: Sequence[tuple[int, int]], tokenize: Callable[[str], list],
                    max_tokens: int = CHUNK_TOKENS) -> list[tuple[int, int, int, int, str]]:
    """(start_token, end_token, start_char, end_char, text) for runs of whole sentences.

    offsets: each token's (start_char, end_char) in `text`; tokenize: text -> token list (the
    splitter's length measure). The chunks tile the tokens: every token belongs to exactly one.
    """
    from llama_index.core.node_parser import SentenceSplitter  # imported here: slow to import

    if not offsets:
        return []
    splitter = SentenceSplitter(chunk_size=max_tokens, chunk_overlap=0, tokenizer=tokenize)
    token_starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    cuts, cursor = {0}, 0
    for piece in splitter.split_text(text):
        found = text.find(piece, cursor)
        if found < 0:  # the splitter changed the piece's whitespace: keep the cuts found so far
            continue
        cuts.add(max(0, int(np.searchsorted(token_starts, found, side="right")) - 1))  # the token holding it
        cursor = found + len(piece)
    bounds = sorted(cut for cut in cuts if cut < len(offsets)) + [len(offsets)]
    chunks = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        start_char, end_char = offsets[start][0], offsets[end - 1][1]
        chunks.append((start, end, start_char, end_char, text[start_char:end_char]))
    return chunks


def chunk_shares(attention: torch.Tensor, doc_ids: Sequence[str], offsets: Sequence[int], window: int,
                 chunks_of: ChunksOf) -> dict[str, np.ndarray]:
    """Per document, each chunk's share of the memory attention (all documents' shares sum to 1).

    attention: (N,) attention summed per memory token, documents concatenated in `doc_ids` order
    from `offsets`. The first token of every reading window is left out: it saw no context when
    read and soaks up attention whatever the question (the document's first token alone drew 25%
    of all memory attention on Pride and Prejudice).
    """
    sums = chunk_sums(attention, doc_ids, offsets, window, chunks_of)
    total = sum(float(per_chunk.sum()) for per_chunk in sums.values())
    return {doc_id: per_chunk / total if total > 0 else np.zeros_like(per_chunk) for doc_id, per_chunk in sums.items()}


def chunk_sums(attention: torch.Tensor, doc_ids: Sequence[str], offsets: Sequence[int], window: int,
               chunks_of: ChunksOf) -> dict[str, np.ndarray]:
    """Per document, the memory attention each chunk's tokens received (window starts left out)."""
    attention = attention.double().clone()
    for position in range(len(doc_ids)):
        attention[int(offsets[position]) : int(offsets[position + 1]) : window] = 0
    sums = {}
    for position, doc_id in enumerate(doc_ids):
        start, end = int(offsets[position]), int(offsets[position + 1])
        chunks, starts = chunks_of(doc_id)
        owner = np.searchsorted(starts, np.arange(end - start), side="right") - 1
        sums[doc_id] = np.bincount(owner, weights=attention[start:end].numpy(), minlength=len(chunks))
    return sums


def rank_chunks(shares: dict[str, np.ndarray], baseline: dict[str, np.ndarray] | None, chunks_of: ChunksOf,
                ranking: Ranking = "lift") -> list[ScoredChunk]:
    """Every chunk with attention, best first: by lift over the baseline, or by plain share."""
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}.")
    scored = []
    for doc_id, per_chunk in shares.items():
        chunks, _ = chunks_of(doc_id)
        base = baseline[doc_id] if baseline is not None else np.zeros_like(per_chunk)
        for index in np.flatnonzero(per_chunk > 0):
            scored.append(ScoredChunk(doc_id, chunks[index], float(per_chunk[index]),
                                      float(per_chunk[index] - base[index])))
    key = (lambda item: item.lift) if ranking == "lift" else (lambda item: item.share)
    return sorted(scored, key=key, reverse=True)


@dataclass(frozen=True)
class Passage:
    """A cited chunk placed before the question, with the neighbouring chunks placed around it
    (in document order; empty when an earlier passage already placed this chunk)."""

    hit: ScoredChunk
    chunks: tuple[Chunk, ...]


def choose_passages(ranked: Sequence[ScoredChunk], budget_tokens: int, chunks_of: ChunksOf | None = None,
                    around: int = CONTEXT_CHUNKS) -> list[Passage]:
    """The best-ranked chunks, each with `around` neighbouring chunks either side, that fit
    `budget_tokens` together, best first. A hit whose neighbours do not fit is placed alone if it
    fits; a chunk is placed once. chunks_of is needed when around > 0."""
    if around and chunks_of is None:
        raise ValueError("choose_passages needs chunks_of to place neighbouring chunks (around > 0).")
    chosen: list[Passage] = []
    placed: set[tuple[str, int]] = set()
    used = 0
    for item in ranked:
        index = item.chunk.index
        if (item.doc_id, index) in placed:  # already in context as an earlier hit's neighbour
            chosen.append(Passage(item, ()))
            continue
        nearby = chunks_of(item.doc_id)[0][max(0, index - around) : index + around + 1] if around else [item.chunk]
        for group in ([c for c in nearby if (item.doc_id, c.index) not in placed], [item.chunk]):
            size = sum(chunk.end_token - chunk.start_token for chunk in group)
            if used + size <= budget_tokens:
                chosen.append(Passage(item, tuple(group)))
                placed.update((item.doc_id, chunk.index) for chunk in group)
                used += size
                break
    return chosen


def placed_runs(chosen: Sequence[Passage]) -> list[tuple[ScoredChunk, tuple[Chunk, ...]]]:
    """The placed chunks as the model reads them: each run of adjacent chunks of one document,
    with the best-ranked hit that placed any of its chunks, best first.

    Two cited chunks a chunk apart place their neighbours side by side: they read as one passage,
    so they are one source (scored as the better of them).
    """
    rank = {id(passage): number for number, passage in enumerate(chosen)}
    placed = sorted(((passage.hit.doc_id, chunk, passage) for passage in chosen for chunk in passage.chunks),
                    key=lambda item: (item[0], item[1].start_token))
    runs: list[tuple[Passage, list[Chunk]]] = []
    for doc_id, chunk, passage in placed:
        last = runs[-1] if runs else None
        if last is not None and last[0].hit.doc_id == doc_id and last[1][-1].end_token == chunk.start_token:
            last[1].append(chunk)
            if rank[id(passage)] < rank[id(last[0])]:
                runs[-1] = (passage, last[1])
        else:
            runs.append((passage, [chunk]))
    runs.sort(key=lambda run: rank[id(run[0])])
    return [(passage.hit, tuple(chunks)) for passage, chunks in runs]


def passage_text(chosen: Sequence[Passage], doc_order: Sequence[str] | None = None) -> str:
    """The placed chunks' stored text: each run of adjacent chunks (`placed_runs`) joined into one
    passage, passages separated by a blank line.

    doc_order None: by rank, the best passage last, so it sits right before the question (measured
    on long-document QA, benchmarks/README.md: 35, 36 and 32 of 70 right at ~4k, ~16k and ~64k tokens
    against 31, 33 and 27 in document order). A sequence of document ids: in document order, the
    documents in that order.
    """
    runs = placed_runs(chosen)[::-1]  # best first -> best last
    if doc_order is not None:
        position = {doc_id: number for number, doc_id in enumerate(doc_order)}
        runs.sort(key=lambda run: (position[run[0].doc_id], run[1][0].start_token))
    passages = []
    for _, chunks in runs:
        text = chunks[0].text
        for before, after in zip(chunks, chunks[1:]):
            text += ("" if before.end_char == after.start_char else " ") + after.text
        passages.append(text.strip())
    return "\n\n".join(passages)
