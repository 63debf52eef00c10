"""Haystacks for long-document QA: a book's evidence region among other books' text.

A cue file (benchmarks/data/*.json) names books, the invented needle sentences to insert, and
cues (a fact with its verbatim evidence, asked in completion form and in question form). For a
target length L (tokens), each book's region (its opening `region_chars` characters from the first
chapter heading, needles inserted) is cut at paragraph ends into parts of at most 3/4 L tokens;
each part is placed at a seeded depth inside text of the other books (from 40,000 characters on,
past their own openings), so the haystack holds the book around the evidence plus distractors.
Everything is seeded: the same haystacks for every method and every machine.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BOOKS_DIR = ROOT.parent / "shared" / "data" / "books"
DISTRACTOR_START = 40_000  # characters: past every book's opening (where cues are asked)

Tokenize = Callable[[str], list]


@dataclass
class Cue:
    id: str
    book: str
    kind: str  # "fact" | "needle"
    evidence: str
    completion: str
    question: str
    answers: list[str]


@dataclass
class Haystack:
    name: str
    book: str
    length: int  # the target length in tokens
    text: str
    cues: list[Cue] = field(default_factory=list)
    evidence: dict[str, tuple[int, int]] = field(default_factory=dict)  # cue id -> char span in text
    part: tuple[int, int] = (0, 0)  # the region part's char span in text


def load_cues(path: Path) -> tuple[dict, list[Cue]]:
    spec = json.loads(path.read_text(encoding="utf-8"))
    cues = []
    for number, item in enumerate(spec["cues"]):
        cues.append(Cue(f"{item['book']}-{number:02d}", item["book"], item["kind"], item["evidence"],
                        item["completion"], item["question"], [a.lower() for a in item["answers"]]))
    return spec, cues


def book_text(book: str, books_dir: Path = BOOKS_DIR) -> str:
    return (books_dir / f"{book}.txt").read_text(encoding="utf-8")


def region(book: str, spec: dict, books_dir: Path = BOOKS_DIR) -> str:
    """The book from its first chapter heading to a paragraph end before region_chars, with its
    needles inserted at the paragraph boundaries nearest 1/3 and 2/3 (needle i at (i+1)/(n+1))."""
    text = book_text(book, books_dir)
    start = re.search(r"^\s*chapter (1|i)\b", text, re.I | re.M).start()
    body = text[start:text.rfind("\n\n", start, start + spec["region_chars"])].strip()
    needles = spec["books"][book].get("needles", [])
    for number in reversed(range(len(needles))):
        at = body.rfind("\n\n", 0, len(body) * (number + 1) // (len(needles) + 1))
        body = body[:at] + "\n\n" + needles[number] + body[at:]
    return body


def _paragraphs(text: str) -> list[str]:
    return [piece for piece in re.split(r"\n\s*\n", text) if piece.strip()]


def _parts(text: str, tokenize: Tokenize, max_tokens: int) -> list[str]:
    parts, current, used = [], [], 0
    for paragraph in _paragraphs(text):
        size = len(tokenize(paragraph)) + 2
        if current and used + size > max_tokens:
            parts.append("\n\n".join(current))
            current, used = [], 0
        current.append(paragraph)
        used += size
    if current:
        parts.append("\n\n".join(current))
    return parts


def _filler(tokens: int, books: list[str], rng: random.Random, tokenize: Tokenize, books_dir: Path) -> str:
    """About `tokens` tokens of whole paragraphs, a run from one distractor book after another."""
    pieces, used = [], 0
    while used < tokens:
        paragraphs = _paragraphs(book_text(rng.choice(books), books_dir)[DISTRACTOR_START:])
        index = rng.randrange(len(paragraphs) // 2)
        while used < tokens and index < len(paragraphs):
            size = len(tokenize(paragraphs[index])) + 2
            if used + size > tokens and pieces:
                return "\n\n".join(pieces)
            pieces.append(paragraphs[index])
            used += size
            index += 1
    return "\n\n".join(pieces)


def build(spec: dict, cues: list[Cue], length: int, tokenize: Tokenize, seed: int = 0,
          books_dir: Path = BOOKS_DIR) -> list[Haystack]:
    """The haystacks of `length` tokens for every book of the cue file (see the module doc)."""
    all_books = sorted(path.stem for path in books_dir.glob("*.txt"))
    haystacks = []
    for book in spec["books"]:
        others = [name for name in all_books if name != book]
        for number, part in enumerate(_parts(region(book, spec, books_dir), tokenize, length * 3 // 4)):
            rng = random.Random(f"{seed}-{book}-{length}-{number}")
            room = max(0, length - len(tokenize(part)))
            before = _filler(int(room * rng.uniform(0.1, 0.9)), others, rng, tokenize, books_dir) if room else ""
            after = _filler(room - len(tokenize(before)), others, rng, tokenize, books_dir) if room else ""
            text = "\n\n".join(piece for piece in (before, part, after) if piece)
            part_start = len(before) + 2 if before else 0
            haystack = Haystack(f"{book}-{length}-{number}", book, length, text,
                                part=(part_start, part_start + len(part)))
            for cue in cues:
                found = part.find(cue.evidence) if cue.book == book else -1
                if found >= 0:
                    haystack.cues.append(cue)
                    haystack.evidence[cue.id] = (part_start + found, part_start + found + len(cue.evidence))
            if haystack.cues:
                haystacks.append(haystack)
    missing = {cue.id for cue in cues} - {cue.id for haystack in haystacks for cue in haystack.cues}
    if missing:
        raise ValueError(f"evidence of cues {sorted(missing)} is not inside one region part at {length} tokens "
                         "(it straddles a part boundary or is misquoted): fix the cue file.")
    return haystacks


def evidence_paragraph(haystack: Haystack, cue: Cue) -> str:
    """The paragraph(s) of the haystack that hold the cue's evidence: the 'evidence alone' context."""
    start, end = haystack.evidence[cue.id]
    lo = haystack.text.rfind("\n\n", 0, start)
    hi = haystack.text.find("\n\n", end)
    return haystack.text[lo + 2 if lo >= 0 else 0: hi if hi >= 0 else len(haystack.text)].strip()


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def correct(answer: str, cue: Cue) -> bool:
    """The normalised first line of the answer contains a normalised accepted answer (as a word)."""
    line = f" {normalise(first_line(answer))} "
    return any(f" {normalise(gold)} " in line for gold in cue.answers)


def overlaps(span: tuple[int, int], other: tuple[int, int]) -> bool:
    return span[0] < other[1] and other[0] < span[1]


def read_into(memory, haystacks: list[Haystack], retrieve: bool) -> float:
    """Read every haystack not yet in the DocumentMemory's store; returns the seconds spent."""
    started = time.perf_counter()
    for haystack in haystacks:
        memory.read_text(haystack.text, name=haystack.name, retrieve=retrieve)
    return time.perf_counter() - started


def evidence_chunks(memory, doc_id: str, span: tuple[int, int]) -> "list[int]":
    """Indexes of the stored chunks of `doc_id` that overlap the character span."""
    chunks, _ = memory._chunks_of(doc_id)
    return [chunk.index for chunk in chunks if overlaps((chunk.start_char, chunk.end_char), span)]
