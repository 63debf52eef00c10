"""Persistent document memories: read a document once into a store, answer from disk in any process.

`DocumentMemory` joins the engine (reading, generation) and the store (`persistence/`): reading
streams each window's keys and values into a `DocumentWriter` together with the text chunks that
map token spans to character spans; asking builds one `PersistentMemory` per memory layer over
the chosen documents and reports, as sources, the chunks whose memory tokens drew the most
attention while the answer was generated.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import platformdirs
import torch

from .config import MemoryConfig
from .engine import MemoryEngine
from .errors import DocumentInputError, NoDocumentsError, QuestionTooLongError
from .models import load_model, model_fingerprint
from .persistence import Chunk, DocumentRecord, MemoryStore, StoreNotFoundError, num_threads
from .persistence.errors import IncompatibleStoreError
from .persistence.metadata import fingerprint_differences, normalise_fingerprint

__all__ = ["DocumentMemory", "Answer", "Source", "default_store_dir", "load_text", "STORE_ENV"]

logger = logging.getLogger(__name__)

STORE_ENV = "FOT_MEMORY_STORE"  # overrides default_store_dir()
CHUNK_TOKENS = 64  # tokens per cited passage: a sentence or two of prose
# Stores keep float16 keys and values and search with hnswlib; reading still retrieves exactly
# from the document's own earlier windows (in RAM).
STORE_DEFAULTS = MemoryConfig(mem_dtype="float16", retrieval="hnsw")
# Fields that change the keys and values a read produces: a store refuses to mix them.
_READING_FIELDS = ("mem_layers", "local_window", "top_k", "positional_mode", "fixed_position", "mem_dtype")


@dataclass(frozen=True)
class Source:
    """A passage that drew memory attention while answering."""

    doc: str  # document name
    doc_id: str
    text: str
    start_char: int
    end_char: int
    weight: float  # share of all attention paid to memory, summed over layers, heads and steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    text: str
    sources: list[Source]

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "sources": [source.to_dict() for source in self.sources]}


def default_store_dir() -> Path:
    """$FOT_MEMORY_STORE, else a directory under the user's data directory."""
    configured = os.environ.get(STORE_ENV)
    return Path(configured).expanduser() if configured else Path(platformdirs.user_data_dir("fot-memory")) / "store"


def load_text(path: str | os.PathLike[str]) -> str:
    """A document's text: UTF-8, not empty, not binary; else DocumentInputError saying why."""
    path = Path(path)
    if not path.is_file():
        raise DocumentInputError(f"{path} is not a file: give the path of a plain-text or markdown file.")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise DocumentInputError(f"{path} looks binary (it contains NUL bytes): give a plain-text or markdown file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentInputError(
            f"{path} is not valid UTF-8 (byte {error.start}): convert it, e.g. `iconv -t UTF-8 {path.name}`."
        ) from None
    if not text.strip():
        raise DocumentInputError(f"{path} is empty: there is nothing to read.")
    return text


class DocumentMemory:
    """A store of documents read by one model under one memory config, and the engine over it."""

    def __init__(self, store: MemoryStore, engine: MemoryEngine) -> None:
        self.store = store
        self.engine = engine
        self._chunk_cache: dict[str, tuple[list[Chunk], np.ndarray]] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        model: str | None = None,
        config: MemoryConfig | None = None,
        device: str | None = None,
        readonly: bool = False,
        store: Any = None,
    ) -> DocumentMemory:
        """Open (or create) a store. An existing store remembers its model and memory config, so
        neither is needed; given ones that differ from what it recorded are refused.

        store: an already-open store to answer from instead of opening `path` (for example a
        `fot_memory_plugin.distributed.ShardedStore`); it must record a fingerprint.
        """
        path = Path(path) if path is not None else default_store_dir()
        recorded = _recorded_fingerprint(path) if store is None else store.fingerprint
        load_as = model or (recorded or {}).get("load_as", "smollm2")
        loaded = load_model(load_as, device=device)
        if config is None and recorded:
            config = STORE_DEFAULTS.replace(**_as_config_fields(recorded["memory_config"]))
        elif config is None:  # a new store: a FoT-tuned model reads with its own layers
            config = loaded.memory_config_for(STORE_DEFAULTS)
        engine = MemoryEngine(loaded.model, loaded.tokenizer, config)
        fingerprint = {
            "load_as": load_as,
            "model": model_fingerprint(loaded.model, loaded.model_id),
            "memory_config": {name: config.to_dict()[name] for name in _READING_FIELDS}
            | {"mem_layers": list(engine.layers)},
        }
        try:
            if store is None:
                store = MemoryStore.open(path, fingerprint=fingerprint, readonly=readonly)
            elif fingerprint_differences(normalise_fingerprint(fingerprint), store.fingerprint):
                raise IncompatibleStoreError(str(store.path), fingerprint_differences(
                    store.fingerprint, normalise_fingerprint(fingerprint)))
        except BaseException:
            engine.close()
            raise
        return cls(store, engine)

    def close(self) -> None:
        self.engine.close()
        self.store.close()

    def __enter__(self) -> DocumentMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def read_file(self, path: str | os.PathLike[str], *, name: str | None = None, **options: Any) -> tuple[DocumentRecord, bool]:
        """Read a text or markdown file; see read_text. The name defaults to the file name."""
        path = Path(path)
        return self.read_text(load_text(path), name=name or path.name, source_path=path.resolve(), **options)

    def read_text(
        self,
        text: str,
        *,
        name: str,
        source_path: str | os.PathLike[str] | None = None,
        force: bool = False,
        progress: bool = False,
        metadata: dict[str, Any] | None = None,
        retrieve: bool = True,
        on_window: Callable[[int, int], None] | None = None,
    ) -> tuple[DocumentRecord, bool]:
        """Read text into the store; returns (record, whether it was read now).

        Text already stored (same sha256; the store's model and config are fixed) is not read
        again unless force=True, which also replaces a document of the same name atomically.
        retrieve=False reads each window without retrieval (MemoryEngine.read): as fast as the
        plain model, and how FoT training computes memory keys; a zero-shot model loses the
        passkey that way. on_window(end_token, num_tokens) is called after each window is stored.
        """
        if not text.strip():
            raise DocumentInputError(f"Document {name!r} is empty: there is nothing to read.")
        sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        existing = self.store.find_by_sha256(sha256)
        if existing is not None and not force:
            logger.info("%s is already stored as %s (%s); use force to read it again", name, existing.name, existing.id)
            return existing, False
        encoding = self.engine.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([encoding["input_ids"]], dtype=torch.long)
        dtype = self.engine.config.mem_dtype
        with self.store.begin_document(
            name, source_path=source_path, sha256=sha256, text_length=len(text),
            metadata=metadata, dtype=dtype, force=force, threads=self._writer_threads(),
        ) as writer:
            writer.add_chunks(_chunks(text, encoding["offset_mapping"]))

            def to_store(start: int, end: int, captured: dict) -> None:
                for layer, (keys, values) in captured.items():
                    writer.append(layer, keys[0], values[0])  # (Hkv, T, D)
                if on_window is not None:
                    on_window(end, ids.shape[1])

            self.engine.reset()
            try:
                self.engine.read(ids, retrieve=retrieve, progress=progress, on_window=to_store)
            finally:
                self.engine.reset()
        return writer.record, True

    def _writer_threads(self) -> int:
        """Store writer threads: one beside a model on the CPU (it needs the cores); with the model
        on a GPU the hnswlib inserts are what limits reading (benchmarks/README.md), so every core
        but one, each taking some of the (layer, KV head) indexes."""
        return 1 if self.engine.device.type == "cpu" else max(1, num_threads() - 1)

    # -- asking ---------------------------------------------------------------------------------

    def ask(
        self,
        question: str,
        *,
        docs: Sequence[str] | None = None,
        max_new_tokens: int = 64,
        chat: bool = True,
        on_text: Callable[[str], None] | None = None,
        num_sources: int = 3,
        exact: bool = False,
        **generate_options: Any,
    ) -> Answer:
        """Answer from the documents named in `docs` (ids or names; None: all), with sources.

        exact=True scans every stored key instead of searching the hnswlib indexes: the
        reference, slower on large stores.
        """
        records, prompt = self._records_and_prompt(question, docs, chat)
        with self._attending(records, exact) as (memories, attention):
            text = self._generate(prompt, max_new_tokens, on_text, generate_options)
        return Answer(text, self._sources(memories, records, attention, num_sources))

    def find_sources(
        self, question: str, *, docs: Sequence[str] | None = None, chat: bool = True, num_sources: int = 3
    ) -> list[Source]:
        """The passages that draw the most memory attention while the model reads the question.

        One forward pass over the question, no answer generated: retrieval for llama-index's
        retrievers and memory blocks. Sources are ranked as in `ask`.
        """
        records, prompt = self._records_and_prompt(question, docs, chat)
        with self._attending(records) as (memories, attention), torch.no_grad():
            self.engine.model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False)
        return self._sources(memories, records, attention, num_sources)

    def _records_and_prompt(
        self, question: str, docs: Sequence[str] | None, chat: bool
    ) -> tuple[list[DocumentRecord], torch.Tensor]:
        records = [self.store.document(doc) for doc in docs] if docs else self.store.documents()
        if not records:
            raise NoDocumentsError(f"The store at {self.store.path} holds no documents: read one first.")
        prompt = self.engine.chat_prompt(question) if chat else self.engine.encode(question)
        if prompt.shape[1] > self.engine.config.context_length:
            raise QuestionTooLongError(
                f"The question is {prompt.shape[1]} tokens; at most {self.engine.config.context_length} fit "
                "the local context. Read long material as a document and ask a short question."
            )
        return records, prompt

    @contextlib.contextmanager
    def _attending(self, records: list[DocumentRecord], exact: bool = False) -> Iterator[tuple[dict, torch.Tensor]]:
        """Memory over `records` attached to the engine; yields (memories, attention per memory token)."""
        exact = exact or self.engine.config.retrieval == "exact"
        memories = {layer: self.store.memory(layer, [r.id for r in records], exact=exact) for layer in self.engine.layers}
        attention = torch.zeros(len(next(iter(memories.values()))), dtype=torch.float64)

        def record(layer: int, token_ids: torch.Tensor, weights: torch.Tensor) -> None:
            found = token_ids >= 0
            attention.index_add_(0, token_ids[found].cpu(), weights[found].double().cpu())

        self.engine.reset(memories)
        try:
            with self.engine.router.recording(record):
                yield memories, attention
        finally:
            self.engine.reset()

    def _generate(self, prompt: torch.Tensor, max_new_tokens: int, on_text: Callable[[str], None] | None, options: dict) -> str:
        if on_text is None:
            new_ids = self.engine.generate(prompt, max_new_tokens=max_new_tokens, **options)
            return self.engine.tokenizer.decode(new_ids[0], skip_special_tokens=True).strip()
        pieces = []
        for piece in self.engine.stream(prompt, max_new_tokens=max_new_tokens, **options):
            on_text(piece)
            pieces.append(piece)
        return "".join(pieces).strip()

    def _sources(self, memories: dict, records: list[DocumentRecord], attention: torch.Tensor, count: int) -> list[Source]:
        """The `count` chunks with the most memory attention, heaviest first.

        The first token of every reading window is left out: it is an attention sink (it saw
        no context when read, and soaks up attention whatever the question; the document's
        very first token alone drew 25% of all memory attention on Pride and Prejudice), so
        it says nothing about where an answer came from. Weights are shares of the rest.
        """
        memory = next(iter(memories.values()))
        attention = attention.clone()
        for position in range(len(memory.doc_ids)):
            start, end = int(memory.offsets[position]), int(memory.offsets[position + 1])
            attention[start:end:self.engine.config.local_window] = 0
        total = float(attention.sum())
        if total <= 0 or count <= 0:
            return []
        by_id = {record.id: record for record in records}
        scored: list[tuple[float, str, Chunk]] = []
        for position, doc_id in enumerate(memory.doc_ids):
            start, end = int(memory.offsets[position]), int(memory.offsets[position + 1])
            chunks, starts = self._chunks_of(doc_id)
            owner = np.searchsorted(starts, np.arange(end - start), side="right") - 1
            per_chunk = np.bincount(owner, weights=attention[start:end].numpy(), minlength=len(chunks))
            for index in np.argsort(per_chunk)[::-1][:count]:
                scored.append((per_chunk[index] / total, doc_id, chunks[index]))
        scored.sort(key=lambda item: item[0], reverse=True)
        return [
            Source(by_id[doc_id].name, doc_id, chunk.text, chunk.start_char, chunk.end_char, round(weight, 6))
            for weight, doc_id, chunk in scored[:count]
            if weight > 0
        ]

    def _chunks_of(self, doc_id: str) -> tuple[list[Chunk], np.ndarray]:
        if doc_id not in self._chunk_cache:
            chunks = self.store.chunks(doc_id)
            self._chunk_cache[doc_id] = (chunks, np.array([chunk.start_token for chunk in chunks], dtype=np.int64))
        return self._chunk_cache[doc_id]

    # -- managing -------------------------------------------------------------------------------

    def documents(self) -> list[DocumentRecord]:
        return self.store.documents()

    def forget(self, id_or_name: str) -> DocumentRecord:
        self._chunk_cache.clear()
        return self.store.forget(id_or_name)

    def info(self) -> dict[str, Any]:
        return self.store.info()


def _recorded_fingerprint(path: Path) -> dict[str, Any] | None:
    """What an existing store recorded (None for a new or empty store)."""
    try:
        with MemoryStore.open(path, create=False, readonly=True) as store:
            return store.fingerprint
    except StoreNotFoundError:
        return None


def _as_config_fields(recorded: dict[str, Any]) -> dict[str, Any]:
    fields = dict(recorded)
    if fields.get("mem_layers") is not None:
        fields["mem_layers"] = tuple(fields["mem_layers"])
    return fields


def _chunks(text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int, int, int, str]]:
    """(start_token, end_token, start_char, end_char, text) for every CHUNK_TOKENS tokens."""
    chunks = []
    for start in range(0, len(offsets), CHUNK_TOKENS):
        end = min(start + CHUNK_TOKENS, len(offsets))
        start_char, end_char = offsets[start][0], offsets[end - 1][1]
        chunks.append((start, end, start_char, end_char, text[start_char:end_char]))
    return chunks
