"""Shared by the store benchmarks: real SmolLM2 keys, values and memory queries from a real book,
and writing them into a `MemoryStore`.

Reading a book is the slow part on a CPU (~60-500 tokens/s, depending on what else runs), so
`read_book` caches what it captured under benchmarks/out/cache/ and later runs reuse it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.core.memory import Memory, Retrieved
from fot_memory_plugin.models.loading import LoadedModel, load_model, model_fingerprint
from fot_memory_plugin.persistence import DocumentRecord, IndexParams, MemoryStore

REPO = Path(__file__).resolve().parents[1]
BOOK = REPO.parent / "shared" / "data" / "books" / "persuasion.txt"
OUT = REPO / "benchmarks" / "out"
STORES = OUT / "stores"

# Completion-form questions about the opening chapters of Persuasion (the part read into memory).
QUESTIONS = (
    "\n\nThe baronet who owns Kellynch Hall is Sir",
    "\n\nThe admiral who rents Kellynch Hall is Admiral",
)

# A window's (keys, values), each (Hkv, T, D), per memory layer.
Window = Mapping[int, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Reading:
    """What the model stored while reading `ids`: per layer keys and values (Hkv, N, D) float16."""

    ids: torch.Tensor  # (N,) token ids read
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor]
    seconds: float | None  # reading time; None when it came from the cache

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    def windows(self, layers: Iterable[int], start: int, end: int, window: int) -> Iterable[Window]:
        """Tokens [start, end) in windows, as {layer: (keys, values) (Hkv, T, D)}."""
        for begin in range(start, end, window):
            stop = min(begin + window, end)
            yield {layer: (self.keys[layer][:, begin:stop], self.values[layer][:, begin:stop]) for layer in layers}


def load_engine(config: MemoryConfig, memories: Mapping[int, Memory] | None = None, model: str = "smollm2",
                device: str | None = None) -> tuple[LoadedModel, MemoryEngine]:
    """SmolLM2-135M (float32; "smollm2-fot" for the FoT-tuned one, in its own memory layers) with
    memory attached under `config`."""
    loaded = load_model(model, device=device)
    return loaded, MemoryEngine(loaded.model, loaded.tokenizer, loaded.memory_config_for(config), memories=memories)


def book_ids(engine: MemoryEngine, book: Path = BOOK) -> torch.Tensor:
    """Token ids (N,) of the whole book."""
    return engine.encode(book.read_text(encoding="utf-8"))[0]


def read_book(engine: MemoryEngine, tokens: int, *, book: Path = BOOK, retrieve: bool = False) -> Reading:
    """Read the book's first `tokens` tokens window by window, keeping every memory layer's keys.

    retrieve=False (the default) reads each window without retrieval: ~3-8x faster here, and
    the keys are still the model's keys on real text (each window just does not see the earlier
    ones). Cached per (book, tokens, window, retrieve, layers).
    """
    window = engine.config.local_window
    layers = engine.layers
    which = "all" if engine.config.mem_layers is None else "-".join(map(str, layers))
    tag = f"{book.stem}-{tokens}-w{window}-{'retrieve' if retrieve else 'noretrieve'}-L{which}"
    cache = OUT / "cache" / f"{tag}.pt"
    if cache.exists():
        saved = torch.load(cache)
        return Reading(saved["ids"], saved["keys"], saved["values"], None)
    ids = book_ids(engine, book)[:tokens]
    if ids.shape[0] < tokens:
        raise ValueError(f"{book} has only {ids.shape[0]} tokens; asked to read {tokens}.")
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {layer: [] for layer in layers}

    def keep(start: int, end: int, captured: Window) -> None:
        for layer in layers:
            keys, values = captured[layer]
            parts[layer].append((keys[0].to(torch.float16), values[0].to(torch.float16)))

    engine.reset()
    started = time.perf_counter()
    engine.read(ids[None], retrieve=retrieve, on_window=keep, progress=True)
    seconds = time.perf_counter() - started
    engine.reset()  # drop the float32 in-RAM copy
    keys = {layer: torch.cat([k for k, _ in parts[layer]], dim=1) for layer in layers}
    values = {layer: torch.cat([v for _, v in parts[layer]], dim=1) for layer in layers}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ids": ids, "keys": keys, "values": values}, cache)
    return Reading(ids, keys, values, seconds)


def prompts(engine: MemoryEngine, ids: torch.Tensor, after: int, length: int) -> list[tuple[str, torch.Tensor]]:
    """Prompts (name, ids (1, length)) from text the memory does not hold (tokens >= after).

    The first continues the text right after the memory; the others are later passages of the
    book ending in a completion-form question about what is in memory.
    """
    found = [("continuation", ids[after : after + length][None])]
    for number, question in enumerate(QUESTIONS):
        question_ids = engine.encode(question)[0]
        start = after + (number + 2) * 8 * length  # well apart from each other
        passage = ids[start : start + length - question_ids.shape[0]]
        found.append((f"passage+question {number + 1}", torch.cat([passage, question_ids])[None]))
    return found


@dataclass
class InstrumentedMemory:
    """A Memory that passes everything to `inner`, timing each search and optionally keeping its queries.

    The router hands a memory exactly the queries the model sends to memory (in the configured
    positional mode), so wrapping the memory captures them without touching the router.
    """

    inner: Memory
    keep_queries: bool = False
    queries: list[torch.Tensor] = field(default_factory=list)  # (1, Hq, T, D) float32, per search
    searches: list[tuple[int, float]] = field(default_factory=list)  # (T, seconds) per search

    def __len__(self) -> int:
        return len(self.inner)

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.inner.append(keys, values)

    def search(self, queries: torch.Tensor, k: int) -> Retrieved:
        if self.keep_queries:
            self.queries.append(queries.detach().float().clone())
        started = time.perf_counter()
        found = self.inner.search(queries, k)
        self.searches.append((queries.shape[2], time.perf_counter() - started))
        return found


class FallbackCounter(logging.Handler):
    """Counts the store's "hnswlib search failed ... falling back to exact search" warnings (and mutes them)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        logging.getLogger("fot_memory_plugin.persistence.hnsw_index").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def recall_at_k(found_scores: torch.Tensor, exact_scores: torch.Tensor) -> torch.Tensor:
    """Per row (..., k): the share of the found keys that score at least the exact k-th best.

    That is recall@k with ties counted as hits: keys of repeated tokens are identical in layer 0
    (its keys depend on the token alone), so ids alone would call an equally good key a miss.
    """
    threshold = exact_scores[..., -1:]
    return (found_scores >= threshold - 1e-5 * threshold.abs().clamp(min=1.0)).float().mean(-1)


def hit_scores(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Inner products (B, Hq, T, k) of queries (B, Hq, T, D) with their retrieved keys (B, Hq, T, k, D)."""
    return torch.einsum("bhtd,bhtkd->bhtk", queries, keys)


def fingerprint(loaded: LoadedModel, config: MemoryConfig, layers: Iterable[int]) -> dict[str, Any]:
    """The store fingerprint: the model, the reading config, and which layers the store holds."""
    model = model_fingerprint(loaded.model, loaded.model_id)
    return {
        **model,
        "memory_config": {"local_window": config.local_window, "positional_mode": config.positional_mode},
        "mem_layers": sorted(layers),
    }


@dataclass
class BuiltStore:
    path: Path
    record: DocumentRecord
    append_seconds: float | None  # None: the store existed and was reused; indexes grow during appends
    commit_seconds: float | None  # the rest of the index building, saving and fsyncs


def build_store(
    path: Path,
    fingerprint: dict[str, Any],
    windows: Iterable[Window],
    *,
    num_tokens: int,
    name: str = "doc",
    index_params: IndexParams | None = None,
    rebuild: bool = False,
) -> BuiltStore:
    """A store at `path` holding one document written from `windows`; reused if it already holds it
    (same name, token count and layers), since building hnswlib indexes takes minutes."""
    if path.exists() and not rebuild:
        with MemoryStore.open(path, readonly=True) as store:
            wanted = (name, num_tokens, tuple(fingerprint["mem_layers"]))
            for record in store.documents():
                current = any(file.endswith(".extra.npz") for file in record.files)  # format 2 indexes
                if (record.name, record.num_tokens, tuple(record.layers)) == wanted and current:
                    return BuiltStore(path, record, None, None)
    if path.exists():
        shutil.rmtree(path)
    with MemoryStore.open(path, fingerprint=fingerprint) as store:
        writer = store.begin_document(name, sha256=f"benchmark-{name}-{num_tokens}", text_length=num_tokens,
                                      index_params=index_params)
        with writer:
            started = time.perf_counter()
            for window in windows:
                for layer, (keys, values) in window.items():
                    writer.append(layer, keys, values)
            appended = time.perf_counter()
        committed = time.perf_counter()
        assert writer.record is not None
        return BuiltStore(path, writer.record, appended - started, committed - appended)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
