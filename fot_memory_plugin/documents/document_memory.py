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
import io
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import platformdirs
import torch

from ..core.config import CHAT_ANSWER_INSTRUCTIONS, DEFAULT_ANSWER_MODE, DEFAULT_INDEX, DEFAULT_RANKING, MemoryConfig
from ..core.engine import MemoryEngine
from ..core.errors import CorruptDocumentError, DocumentInputError, NoDocumentsError, QuestionTooLongError
from ..models.loading import load_model, model_fingerprint
from .passages import (
    ANSWER_MODES,
    BASELINE_PROBE,
    AnswerMode,
    Passage,
    Ranking,
    ScoredChunk,
    choose_passages,
    chunk_shares,
    chunk_sums,
    passage_text,
    placed_runs,
    rank_chunks,
    sentence_chunks,
)
from .voting_heads import VotingHeads
from ..persistence import Chunk, DocumentRecord, IndexParams, MemoryStore, StoreNotFoundError, num_threads
from ..persistence.errors import IncompatibleStoreError, StoreError
from ..persistence.metadata import fingerprint_differences, normalise_fingerprint
from ..persistence.files import validate_name
from ..persistence.writer import estimate_document_bytes

__all__ = ["DocumentMemory", "Answer", "Source", "LeftOut", "default_store_dir", "load_text", "STORE_ENV",
           "DOCUMENT_MODEL"]

logger = logging.getLogger(__name__)

# Bump when what a baseline's shares are computed from changes (kept baselines are then recomputed).
_BASELINE_VERSION = 1

STORE_ENV = "FOT_MEMORY_STORE"  # overrides default_store_dir()
# The model a new store reads with unless told: the FoT-tuned delta. On long-document QA over
# held-out books its memory attention finds the evidence as often as MiniLM RAG does and the
# zero-shot model's does not (benchmarks/README.md, "Long-document QA"); its stores are 5.9x
# smaller and it reads at the plain model's speed.
DOCUMENT_MODEL = "smollm2-fot"

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
    lift: float = 0.0  # weight minus the share a question-independent probe gives it (passages.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LeftOut:
    """A document a question did not name and could not use: its files are damaged."""

    doc: str
    doc_id: str
    problem: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    text: str
    sources: list[Source]
    left_out: list[LeftOut] = field(default_factory=list)  # damaged documents skipped

    def to_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "sources": [source.to_dict() for source in self.sources],
                "left_out": [item.to_dict() for item in self.left_out]}


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

    def __init__(self, store: MemoryStore, engine: MemoryEngine, *, read_with_retrieval: bool = True) -> None:
        self.store = store
        self.engine = engine
        # How read_text computes memory keys unless told: without retrieval for a FoT-tuned model
        # (as its training does), with it for a zero-shot one (it loses the passkey otherwise).
        self.read_with_retrieval = read_with_retrieval
        self._chunk_cache: dict[str, tuple[list[Chunk], np.ndarray]] = {}
        self._baselines: dict[tuple, dict[str, np.ndarray]] = {}  # (doc ids, chat, exact, heads) -> probe shares
        # The heads whose memory attention ranks passages (voting_heads.py); None: every head.
        fingerprint = store.fingerprint or {}
        self.voting_heads: VotingHeads | None = VotingHeads.for_model(
            fingerprint.get("load_as"), fingerprint, engine.layers)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        model: str | None = None,
        config: MemoryConfig | None = None,
        device: str | None = None,
        readonly: bool = False,
        create: bool = True,
        hold_lock: bool = False,
        shared: bool = False,
        store: Any = None,
        mem_dtype: str | None = None,
    ) -> DocumentMemory:
        """Open (or, with create, make) a store. An existing store remembers its model and memory
        config, so neither is needed; given ones that differ from what it recorded are refused.
        mem_dtype: how a new store keeps keys and values (MemoryConfig.mem_dtype: default
        "float16"; "int8" takes half the disk); an existing store refuses another than its own.

        The store is opened BEFORE the model loads, so a missing, locked or damaged store fails
        at once. hold_lock: keep the writer lock until close (see MemoryStore.open); shared: a new
        store's files get the umask instead of owner-only permissions. store: an already-open
        store to answer from instead of opening `path` (for example a
        `fot_memory_plugin.distributed.ShardedStore`); it must record a fingerprint.
        """
        owns_store = store is None
        if store is None:
            path = Path(path) if path is not None else default_store_dir()
            store = MemoryStore.open(path, readonly=readonly, create=create, hold_lock=hold_lock, shared=shared)
        try:
            engine, trained = cls._engine_for(store, model, config, device, mem_dtype)
        except BaseException:
            if owns_store:
                store.close()
            raise
        return cls(store, engine, read_with_retrieval=not trained)

    @staticmethod
    def _engine_for(store: Any, model: str | None, config: MemoryConfig | None,
                    device: str | None, mem_dtype: str | None = None) -> tuple[MemoryEngine, bool]:
        """Load the store's model (or the given one) and bind the store to its fingerprint;
        returns the engine and whether the model learnt memory keys read without retrieval."""
        recorded = store.fingerprint
        # a store from before load_as was recorded was read with the zero-shot default
        load_as = model or (recorded.get("load_as", "smollm2") if recorded else DOCUMENT_MODEL)
        loaded = load_model(load_as, device=device)
        if config is None and recorded:
            config = STORE_DEFAULTS.replace(**_as_config_fields(recorded["memory_config"]))
        elif config is None:  # a new store: a FoT-tuned model reads with its own layers
            config = loaded.memory_config_for(STORE_DEFAULTS)
        if mem_dtype is not None:  # (a store that recorded another refuses it below)
            config = config.replace(mem_dtype=mem_dtype)
        engine = MemoryEngine(loaded.model, loaded.tokenizer, config, base_weights=loaded.base_weights)
        fingerprint = {
            "load_as": load_as,
            "model": model_fingerprint(loaded.model, loaded.model_id),
            "memory_config": {name: config.to_dict()[name] for name in _READING_FIELDS}
            | {"mem_layers": list(engine.layers)},
        }
        try:
            if isinstance(store, MemoryStore):
                store.bind_fingerprint(fingerprint)
            else:  # a store of another kind (sharded): its fingerprint must be this model's
                differences = fingerprint_differences(store.fingerprint, normalise_fingerprint(fingerprint))
                if differences:
                    raise IncompatibleStoreError(str(store.path), differences)
        except BaseException:
            engine.close()
            raise
        return engine, loaded.reads_without_retrieval

    def close(self) -> None:
        self.engine.close()
        self.store.close()

    def __enter__(self) -> DocumentMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------

    def read_file(self, path: str | os.PathLike[str], *, name: str | None = None, **options: Any) -> tuple[DocumentRecord, bool]:
        """Read a text or markdown file; see read_text. The name defaults to the file name.

        A symbolic link is followed: the text is the target's, the source path recorded is the
        path as given (absolute), and the target's path is kept in the metadata as `link_target`.
        """
        path = Path(path)
        name = validate_name(path.name if name is None else name)
        text = load_text(path)
        given = path.absolute()
        if given.resolve() != given:
            options["metadata"] = {**(options.get("metadata") or {}), "link_target": str(given.resolve())}
        return self.read_text(text, name=name, source_path=given, **options)

    def read_text(
        self,
        text: str,
        *,
        name: str,
        source_path: str | os.PathLike[str] | None = None,
        force: bool = False,
        progress: bool = False,
        metadata: dict[str, Any] | None = None,
        retrieve: bool | None = None,
        on_window: Callable[[int, int], None] | None = None,
        index: str | None = None,
        prepare: bool = True,
    ) -> tuple[DocumentRecord, bool]:
        """Read text into the store; returns (record, whether it was read now).

        Text already stored (same sha256; the store's model and config are fixed) is not read
        again unless force=True, which also replaces a document of the same name atomically.
        retrieve=False reads each window without retrieval (MemoryEngine.read): as fast as the
        plain model, and how FoT training computes memory keys; a zero-shot model loses the
        passkey that way. None: `self.read_with_retrieval` (False for a FoT-tuned model). on_window(end_token, num_tokens) is called after each window is stored.
        index: how the document's keys are indexed, "clusters" or "hnsw" (default DEFAULT_INDEX).
        prepare: then `prepare_answers` over the store (two probe passes; a batch of reads passes
        False to all but its last).
        """
        name = validate_name(name)
        index_params = IndexParams(kind=index or DEFAULT_INDEX)  # bad input fails before any reading
        retrieve = self.read_with_retrieval if retrieve is None else retrieve
        if not text.strip():
            raise DocumentInputError(f"Document {name!r} is empty: there is nothing to read.")
        sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
        existing = self.store.find_by_sha256(sha256)
        if existing is not None and not force:
            if existing.name != name:
                logger.warning("%r has the same text as the stored %r (%s): not read again; use force to "
                               "store it under the new name too", name, existing.name, existing.id)
            return existing, False
        encoding = self.engine.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([encoding["input_ids"]], dtype=torch.long)
        dtype = self.engine.config.mem_dtype
        needed = self._needed_bytes(ids.shape[1], index_params.kind)
        self.store.require_space(needed)  # before minutes of reading, not after
        with self.store.begin_document(
            name, source_path=source_path, sha256=sha256, text_length=len(text),
            metadata=metadata, dtype=dtype, force=force, threads=self._writer_threads(index_params.kind),
            expected_bytes=needed,
            index_params=index_params, index_device=self._index_device(),
        ) as writer:
            writer.add_chunks(sentence_chunks(text, encoding["offset_mapping"], self._tokenize))

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
        if prepare:
            self.prepare_answers()
        return writer.record, True

    def _tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text, add_special_tokens=False)

    def _needed_bytes(self, num_tokens: int, index: str = DEFAULT_INDEX) -> int:
        """About how much disk a document of `num_tokens` tokens takes in this store."""
        config = self.engine.model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return estimate_document_bytes(num_tokens, layers=len(self.engine.layers), kv_heads=kv_heads,
                                       head_dim=head_dim, dtype=self.engine.config.mem_dtype, kind=index)

    def _index_device(self) -> str | None:
        """Cluster indexes are computed where the model runs (k-means: seconds per layer on a CPU)."""
        return None if self.engine.device.type == "cpu" else str(self.engine.device)

    def _writer_threads(self, index: str) -> int:
        """Store writer threads: one beside a model on the CPU (it needs the cores), and for cluster
        indexes (the thread only writes .kv files; more threads only take the GIL from the model's
        kernel launches); with the model on a GPU the hnswlib inserts are what limits reading
        (benchmarks/README.md), so every core but one, each taking some of the (layer, KV head) indexes."""
        return 1 if self.engine.device.type == "cpu" or index == "clusters" else max(1, num_threads() - 1)

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
        answer_mode: AnswerMode = DEFAULT_ANSWER_MODE,
        ranking: Ranking = DEFAULT_RANKING,
        instruction: str | None = None,
        **generate_options: Any,
    ) -> Answer:
        """Answer from the documents named in `docs` (ids or names; None: all), with sources.

        answer_mode: "memory" generates with the memory layers attending to the documents;
        "passages" first finds the passages the question draws memory attention to, puts their
        text (each with a neighbouring chunk either side, the best last, as much as fits the
        local context beside the question and the answer) before the question, then generates
        from that text with memory detached; "reread" does the same with memory still attached.
        Their sources are the placed passages (each run of adjacent placed chunks: cited chunks
        with their neighbours, best first), then the cited chunks that did not fit, up to
        num_sources. ranking: "lift" ranks passages by the attention the question gives them
        beyond a question-independent probe (attention sinks drop out), "attention" by plain
        share. instruction: appended to a question asked in the chat template (chat=True); None:
        the answer mode's own (CHAT_ANSWER_INSTRUCTIONS: "passages" asks for an answer in a few
        words), "" for none. exact=True scans every stored key instead of searching the indexes: the
        reference, slower on large stores. A damaged document is left out (with a warning, and
        listed in `Answer.left_out`) unless `docs` names it, which raises CorruptDocumentError.
        Everything the answer needs is opened before generating, so a document forgotten by
        another process meanwhile still answers.
        """
        if answer_mode not in ANSWER_MODES:
            raise ValueError(f"answer_mode must be one of {ANSWER_MODES}, got {answer_mode!r}.")
        if chat:
            question += CHAT_ANSWER_INSTRUCTIONS.get(answer_mode, "") if instruction is None else instruction
        records, left_out, prompt = self._records_and_prompt(question, docs, chat)
        by_id = {record.id: record for record in records}
        if answer_mode in ("reread", "passages"):
            ranked = self._passages(records, prompt, chat, exact, ranking)
            placed, prompt = self._reread_prompt(question, ranked, chat, max_new_tokens)
            if not placed:
                logger.warning("no passage fits the local context beside the question: answering from %s alone",
                               "memory" if answer_mode == "reread" else "the question")
            if answer_mode == "reread":
                with self._attending(records, exact):
                    text = self._generate(prompt, max_new_tokens, on_text, generate_options)
            else:
                text = self._generate(prompt, max_new_tokens, on_text, {**generate_options, "plain": True})
            # what the model read first (each passage with its neighbours), then the cited chunks that did not fit
            runs = placed_runs(placed)
            sources = [_source(hit, by_id, chunks) for hit, chunks in runs]
            hits = {passage.hit for passage in placed}
            sources += [_source(item, by_id) for item in ranked if item not in hits]
            return Answer(text, sources[:num_sources], left_out)
        with self._attending(records, exact) as (memories, attention):
            text = self._generate(prompt, max_new_tokens, on_text, generate_options)
        ranked = self._rank(memories, attention, records, chat, exact, ranking)
        return Answer(text, [_source(item, by_id) for item in ranked[:num_sources]], left_out)

    def find_sources(
        self, question: str, *, docs: Sequence[str] | None = None, chat: bool = True, num_sources: int = 3,
        ranking: Ranking = DEFAULT_RANKING, exact: bool = False,
    ) -> list[Source]:
        """The passages that draw the most memory attention while the model reads the question.

        One forward pass over the question, no answer generated: retrieval for llama-index's
        retrievers and memory blocks, and the first step of re-read answering. Ranked as in `ask`.
        """
        records, _, prompt = self._records_and_prompt(question, docs, chat)
        by_id = {record.id: record for record in records}
        return [_source(item, by_id) for item in self._passages(records, prompt, chat, exact, ranking)[:num_sources]]

    def head_attention(self, question: str, *, docs: Sequence[str] | None = None, chat: bool = True,
                       exact: bool = True) -> tuple[list[tuple[int, int]], dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every memory head's attention per chunk under the question and under BASELINE_PROBE,
        for calibrating voting heads. Returns (labels: (layer, head) per row; per document an
        (H, C) array of attention sums under the question; the same under the probe)."""
        records, _, prompt = self._records_and_prompt(question, docs, chat)
        probe = self._prompt(BASELINE_PROBE, chat)
        results = []
        for ids in (prompt, probe):
            with self._attending(records, exact, per_head=True) as (memories, attention), torch.no_grad():
                self.engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            memory = next(iter(memories.values()))
            flat = attention.reshape(attention.shape[0], -1)  # (N, layers * heads)
            columns = [chunk_sums(flat[:, column], memory.doc_ids, memory.offsets,
                                  self.engine.config.local_window, self._chunks_of) for column in range(flat.shape[1])]
            results.append({doc_id: np.stack([column[doc_id] for column in columns]) for doc_id in columns[0]})
        heads = self.engine.model.config.num_attention_heads
        labels = [(layer, head) for layer in self.engine.layers for head in range(heads)]
        return labels, results[0], results[1]

    def _passages(self, records: list[DocumentRecord], prompt: torch.Tensor, chat: bool, exact: bool,
                  ranking: Ranking) -> list[ScoredChunk]:
        """Every chunk the prompt draws memory attention to (one forward pass), best first."""
        with self._attending(records, exact) as (memories, attention), torch.no_grad():
            self.engine.model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False)
        return self._rank(memories, attention, records, chat, exact, ranking)

    def _rank(self, memories: dict, attention: torch.Tensor, records: list[DocumentRecord], chat: bool,
              exact: bool, ranking: Ranking) -> list[ScoredChunk]:
        memory = next(iter(memories.values()))
        shares = chunk_shares(attention, memory.doc_ids, memory.offsets, self.engine.config.local_window,
                              self._chunks_of)
        baseline = self._baseline(records, chat, exact) if ranking == "lift" else None
        return rank_chunks(shares, baseline, self._chunks_of, ranking)

    def _baseline(self, records: list[DocumentRecord], chat: bool, exact: bool) -> dict[str, np.ndarray]:
        """Chunk shares under BASELINE_PROBE over these documents: computed once per store and
        set of documents (a forward pass over all of them: ~1 s at 1M tokens on 2 cores), kept in
        the store where it is writable (`prepare_answers` after each read), else in this process."""
        voting = None if self.voting_heads is None else tuple(sorted(self.voting_heads.heads.items()))
        key = (tuple(record.id for record in records), chat, exact, voting)
        if key not in self._baselines:
            stored_key = self._baseline_key(key)
            shares = self._stored_baseline(stored_key, records)
            if shares is None:
                probe = self._prompt(BASELINE_PROBE, chat)
                with self._attending(records, exact) as (memories, attention), torch.no_grad():
                    self.engine.model(input_ids=probe, attention_mask=torch.ones_like(probe), use_cache=False)
                memory = next(iter(memories.values()))
                shares = chunk_shares(attention, memory.doc_ids, memory.offsets, self.engine.config.local_window,
                                      self._chunks_of)
                self._keep_baseline(stored_key, shares)
            self._baselines[key] = shares
        return self._baselines[key]

    def _baseline_key(self, key: tuple) -> str:
        """The store's key for a baseline (`_baseline`'s key: doc ids, chat, exact, voting heads),
        with everything else its shares depend on besides the documents' contents (which their ids fix)."""
        docs, chat, exact, voting = key
        described = {"what": "baseline chunk shares", "version": _BASELINE_VERSION, "docs": docs, "chat": chat,
                     "exact": exact, "voting": voting, "probe": BASELINE_PROBE, "config": self.engine.config.to_dict()}
        return "baseline:" + hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()

    def _stored_baseline(self, stored_key: str, records: list[DocumentRecord]) -> dict[str, np.ndarray] | None:
        value = self.store.derived(stored_key) if isinstance(self.store, MemoryStore) else None  # sharded: none
        if value is None:
            return None
        with np.load(io.BytesIO(value), allow_pickle=False) as data:
            shares = {name: data[name] for name in data.files}
        if sorted(shares) != sorted(record.id for record in records) or any(
                len(shares[record.id]) != len(self._chunks_of(record.id)[0]) for record in records):
            logger.warning("ignoring a kept baseline that does not fit the documents' chunks: recomputing it")
            return None
        return shares

    def _keep_baseline(self, stored_key: str, shares: dict[str, np.ndarray]) -> None:
        """Keep computed shares in the store, if this process may write and no writer is busy."""
        if not self._can_keep:
            return
        buffer = io.BytesIO()
        np.savez(buffer, **shares)
        try:
            self.store.keep_derived(stored_key, buffer.getvalue(), lock_timeout=0)
        except StoreError as error:  # a busy writer or a full disk: the answer does not need it kept
            logger.debug("baseline shares not kept in the store: %s", error)

    def prepare_answers(self) -> None:
        """Compute and keep in the store what the first answer over all its documents needs
        besides the question (the baseline probe's chunk shares, for chat and completion
        prompts), so that a new process, even a read-only one, answers without computing it.
        `read_text` calls it after each document it reads. Nothing to do where nothing can be kept
        (a read-only store, or one sharded over Ray actors). A store error here (a damaged
        document, say) is logged, not raised: the first answer then computes what is missing."""
        if not self._can_keep:
            return
        try:
            records, _ = self._usable(self.store.documents(), named=False)
            for chat in (True, False):
                self._baseline(records, chat, exact=False)
        except StoreError as error:
            logger.warning("could not prepare answers over the store at %s: %s", self.store.path, error)

    @property
    def _can_keep(self) -> bool:
        """Whether derived data can be kept in this store (a writable MemoryStore)."""
        return isinstance(self.store, MemoryStore) and not self.store.readonly

    def _reread_prompt(self, question: str, ranked: list[ScoredChunk], chat: bool,
                       max_new_tokens: int) -> tuple[list[Passage], torch.Tensor]:
        """(the passages placed, best first; the prompt: their text with the best passage last, a
        blank line, the question), within the local context less the question's and answer's tokens."""
        prompt = self._prompt(question, chat)
        budget = self.engine.config.context_length - prompt.shape[1] - max_new_tokens
        placed = choose_passages(ranked, budget, self._chunks_of)
        while True:
            text = passage_text(placed)
            content = f"{text}\n\n{question}" if text else question
            full = self._prompt(content, chat)
            if full.shape[1] + max_new_tokens <= self.engine.config.context_length or not placed:
                return placed, full
            placed = placed[:-1]  # re-encoded text can be a few tokens longer than its chunks

    def _prompt(self, text: str, chat: bool) -> torch.Tensor:
        """Token ids (1, N) of `text`, in the chat template or as plain text to complete."""
        return self.engine.chat_prompt(text) if chat else self.engine.encode(text)

    def _records_and_prompt(
        self, question: str, docs: Sequence[str] | None, chat: bool
    ) -> tuple[list[DocumentRecord], list[LeftOut], torch.Tensor]:
        records = [self.store.document(doc) for doc in docs] if docs else self.store.documents()
        if not records:
            raise NoDocumentsError(f"The store at {self.store.path} holds no documents: read one first.")
        records, left_out = self._usable(records, named=bool(docs))
        prompt = self._prompt(question, chat)
        if prompt.shape[1] > self.engine.config.context_length:
            raise QuestionTooLongError(
                f"The question is {prompt.shape[1]} tokens; at most {self.engine.config.context_length} fit "
                "the local context. Read long material as a document and ask a short question."
            )
        for record in records:  # chunks now: a forget during generation cannot take them away
            self._chunks_of(record.id)
        return records, left_out, prompt

    def _usable(self, records: list[DocumentRecord], named: bool) -> tuple[list[DocumentRecord], list[LeftOut]]:
        """The documents whose files check out; damaged ones are an error if named, else left out."""
        good, damaged = self.store.usable(records)
        by_id = {record.id: record for record in records}
        if damaged and named:
            doc_id, problem = next(iter(damaged.items()))
            raise CorruptDocumentError(doc_id, by_id[doc_id].name, problem)
        left_out = [LeftOut(by_id[doc_id].name, doc_id, problem) for doc_id, problem in damaged.items()]
        for item in left_out:
            logger.warning("left out damaged document %r (%s): %s", item.doc, item.doc_id, item.problem)
        if not good:
            raise NoDocumentsError(f"Every document in the store at {self.store.path} is damaged: "
                                   "run `fot-memory verify` to see why, then forget and read them again.")
        return good, left_out

    @contextlib.contextmanager
    def _attending(self, records: list[DocumentRecord], exact: bool = False,
                   per_head: bool = False) -> Iterator[tuple[dict, torch.Tensor]]:
        """Memory over `records` attached to the engine; yields (memories, attention per memory
        token): (N,) summed over the voting heads, or with per_head (N, layers, query heads)."""
        exact = exact or self.engine.config.retrieval == "exact"
        memories = {layer: self.store.memory(layer, records, exact=exact) for layer in self.engine.layers}
        size = len(next(iter(memories.values())))
        heads = self.engine.model.config.num_attention_heads
        slot = {layer: number for number, layer in enumerate(self.engine.layers)}
        attention = torch.zeros((size, len(slot), heads) if per_head else size, dtype=torch.float64)
        voting = self.voting_heads if not per_head else None
        masks: dict[int, torch.Tensor] = {}

        def record(layer: int, token_ids: torch.Tensor, weights: torch.Tensor) -> None:
            # token_ids, weights: (B, Hq, T, k); a missing hit has token id -1
            if voting is not None:
                if layer not in masks:
                    masks[layer] = voting.mask(layer, heads, weights.device).view(1, -1, 1, 1)
                weights = weights * masks[layer]
            found = token_ids >= 0
            if per_head:
                head_index = torch.arange(heads, device=token_ids.device).view(1, -1, 1, 1).expand_as(token_ids)
                attention.index_put_((token_ids[found].cpu(), torch.full_like(token_ids[found], slot[layer]).cpu(),
                                      head_index[found].cpu()), weights[found].double().cpu(), accumulate=True)
            else:
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
    """What an existing store recorded (None for a new or empty store); opens it read-only."""
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


def _source(item: ScoredChunk, records: dict[str, DocumentRecord], chunks: Sequence[Chunk] = ()) -> Source:
    """A cited chunk as a source, or the placed `chunks` around it as one: their span and text
    (chunks tile the document's characters), scored as the cited chunk; the cited chunk alone
    where the chunks leave a gap."""
    if not chunks or any(before.end_char != after.start_char for before, after in zip(chunks, chunks[1:])):
        chunks = (item.chunk,)
    return Source(records[item.doc_id].name, item.doc_id, "".join(chunk.text for chunk in chunks),
                  chunks[0].start_char, chunks[-1].end_char, round(item.share, 6), round(item.lift, 6))
