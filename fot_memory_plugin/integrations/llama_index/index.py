"""llama-index documents in a FoT memory store: reading, a retriever, a query engine, reopening.

`FoTMemoryIndex` reads `Document`s from any llama-index reader into a `DocumentMemory` store
(the persist directory), keeping each document's id and metadata in the store's SQLite
database. Its retriever returns, as `NodeWithScore`s, the passages that draw the most memory
attention while the model reads the question (the score is that share of memory attention);
its query engine answers from memory and cites the passages that drew the most attention while
the answer was generated (streaming too), and its chat engines are llama-index's own around
them. `from_persist_dir` reopens a store in any later process: the store is the persist
directory, and a llama-index `StorageContext` is refused with a sentence saying so (its
docstore, index store and vector store have nothing to hold; README, "Persisting").

    >>> documents = SimpleDirectoryReader(input_files=["novel.txt"]).load_data()   # doctest: +SKIP
    >>> index = FoTMemoryIndex.from_documents(documents, persist_dir="store")
    >>> response = index.as_query_engine().query("Netherfield Park is let at last, to a young man named Mr.")
    >>> response.source_nodes[0].node.text
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections import Counter
from typing import Any, Iterator, List, Optional, Sequence

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.query_engine import CustomQueryEngine
from llama_index.core.schema import (
    Document,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)

from ...core.config import DEFAULT_ANSWER_MODE, DEFAULT_RANKING, AnswerMode, MemoryConfig, Ranking
from ...core.errors import StorageContextError, UnknownOptionError
from ...documents.document_memory import Answer, DocumentMemory, Source
from ...persistence import DocumentRecord, StoreNotFoundError
from ...documents.long_prompts import ask_any_length
from .streaming import StrippedDeltas, in_thread

__all__ = ["FoTMemoryIndex", "FoTMemoryRetriever", "FoTMemoryQueryEngine", "METADATA_KEY"]

logger = logging.getLogger(__name__)

METADATA_KEY = "llama_index"  # DocumentRecord.metadata[METADATA_KEY] = {"ref_doc_id", "metadata"}
# Documents of more reading windows than this get a progress bar by default: ~4k tokens take
# 10-20 s to read on 2 CPU cores (README, reading speed).
LONG_INPUT_WINDOWS = 8


class FoTMemoryIndex:
    """Documents read into a persistent FoT memory, with llama-index's retriever and query engine.

    The store directory is the persist directory: every document is durable once read, so
    there is nothing to `persist()` later.
    """

    def __init__(self, memory: DocumentMemory, *, owns_memory: bool = False) -> None:
        self.memory = memory
        self._owns_memory = owns_memory

    @classmethod
    def from_documents(
        cls,
        documents: Sequence[Document],
        persist_dir: str | os.PathLike[str] | None = None,
        *,
        model: str | None = None,
        config: MemoryConfig | None = None,
        device: str | None = None,
        show_progress: bool | None = None,
        storage_context: Any = None,
    ) -> FoTMemoryIndex:
        """Open (or create) the store at `persist_dir` and read the documents not stored yet.

        show_progress: a progress bar per document while reading; None (the default) shows one
        for documents of more than a few reading windows, where reading takes more than seconds.
        storage_context is refused (StorageContextError): the store at persist_dir is where the
        documents live, and `from_persist_dir` reopens it.
        """
        if storage_context is not None:
            raise StorageContextError(
                "FoTMemoryIndex keeps its documents in its own store (key/value memory per layer, hnswlib indexes, "
                "SQLite), which a StorageContext's docstore and vector store cannot hold: pass persist_dir=DIR to "
                "from_documents instead, and reopen it in a later process with FoTMemoryIndex.from_persist_dir(DIR)."
            )
        index = cls(DocumentMemory.open(persist_dir, model=model, config=config, device=device), owns_memory=True)
        try:
            index.insert_documents(documents, show_progress=show_progress)
        except BaseException:
            index.close()
            raise
        return index

    @classmethod
    def from_persist_dir(
        cls, persist_dir: str | os.PathLike[str], *, device: str | None = None, readonly: bool = False
    ) -> FoTMemoryIndex:
        """Reopen a store written by `from_documents`, with the model and config it recorded."""
        if not os.path.exists(os.path.join(os.path.expanduser(persist_dir), "memory.sqlite")):
            raise StoreNotFoundError(str(persist_dir))
        return cls(DocumentMemory.open(persist_dir, device=device, readonly=readonly), owns_memory=True)

    def close(self) -> None:
        if self._owns_memory:
            self.memory.close()

    def __enter__(self) -> FoTMemoryIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def persist_dir(self) -> str:
        return str(self.memory.store.path)

    def persist(self, persist_dir: str | os.PathLike[str] | None = None) -> None:
        """A no-op kept for llama-index habits: documents are durable as soon as they are read."""
        if persist_dir is not None and os.path.abspath(os.path.expanduser(persist_dir)) != self.persist_dir:
            raise ValueError(f"This index lives in {self.persist_dir}; it cannot be persisted elsewhere.")

    # -- documents ------------------------------------------------------------------------------

    def insert_documents(
        self, documents: Sequence[Document], *, show_progress: bool | None = None
    ) -> list[DocumentRecord]:
        """Read each document not stored yet (same text: skipped); returns their records in order.

        A document is named by its `file_name` metadata (else its id); names shared within the
        batch or with another stored document get the document id appended. A document whose
        id is already stored under its name with other text replaces that version.
        """
        named = Counter(_base_name(document) for document in documents)
        records = [
            self.insert(document, name=_base_name(document) if named[_base_name(document)] == 1 else None,
                        show_progress=show_progress, prepare=False)
            for document in documents
        ]
        if records:
            self.memory.prepare_answers()  # once for the batch (DocumentMemory.read_text's prepare)
        return records

    def insert(
        self, document: Document, *, name: str | None = None, show_progress: bool | None = None,
        prepare: bool = True,
    ) -> DocumentRecord:
        """Read one llama-index Document into memory (skipped if its text is stored already).

        show_progress=None shows a progress bar for a document longer than LONG_INPUT_WINDOWS
        reading windows (about 4 characters a token): reading takes more than seconds there."""
        if show_progress is None:
            show_progress = len(document.text) > 4 * LONG_INPUT_WINDOWS * self.memory.engine.config.local_window
        name = name or f"{_base_name(document)} [{document.id_}]"
        replace = False
        stored = {record.name: record for record in self.memory.documents()}
        if name in stored:
            if _ref_doc_id(stored[name]) == document.id_:
                if stored[name].sha256 == hashlib.sha256(document.text.encode("utf-8")).hexdigest():
                    return stored[name]
                replace = True  # a new version of the same document
            else:
                name = f"{name} [{document.id_}]"
        metadata = {METADATA_KEY: {"ref_doc_id": document.id_, "metadata": _jsonable(document.metadata)}}
        record, fresh = self.memory.read_text(
            document.text, name=name, metadata=metadata, force=replace, progress=show_progress,
            source_path=document.metadata.get("file_path"), prepare=prepare,
        )
        logger.info("%s %s (%d tokens)", "read" if fresh else "already stored:", record.name, record.num_tokens)
        return record

    def delete_ref_doc(self, ref_doc_id: str) -> None:
        """Forget the stored document read from the llama-index Document with this id."""
        for record in self.memory.documents():
            if _ref_doc_id(record) == ref_doc_id:
                self.memory.forget(record.id)
                return
        raise KeyError(f"No stored document was read from a Document with id {ref_doc_id!r}.")

    @property
    def ref_docs(self) -> dict[str, DocumentRecord]:
        """Stored documents by the id of the llama-index Document they were read from."""
        return {_ref_doc_id(record) or record.id: record for record in self.memory.documents()}

    def resolve(self, docs: Sequence[str] | None) -> list[str] | None:
        """Store document ids for names, store ids or llama-index document ids (None: all)."""
        if docs is None:
            return None
        by_ref = self.ref_docs
        return [by_ref[doc].id if doc in by_ref else self.memory.store.document(doc).id for doc in docs]

    def nodes(self, sources: Sequence[Source], ranking: Ranking = DEFAULT_RANKING) -> list[NodeWithScore]:
        """Sources as llama-index nodes: the passage text, its character span, its document's
        metadata. A node's score is what ranked it (lift or attention share); its metadata has
        both ("attention_share", "lift")."""
        records = {record.id: record for record in self.memory.documents()}
        return [_node(source, records.get(source.doc_id), ranking) for source in sources]

    @property
    def storage_context(self) -> Any:
        raise AttributeError(
            f"FoTMemoryIndex has no StorageContext: its store at {self.persist_dir} holds everything and is durable "
            f"as soon as a document is read, so there is nothing to persist; reopen it with "
            f"FoTMemoryIndex.from_persist_dir({self.persist_dir!r})."
        )

    # -- llama-index objects ----------------------------------------------------------------------

    def as_retriever(self, **options: Any) -> FoTMemoryRetriever:
        """A retriever over this index; options: similarity_top_k (passages returned), memory_docs,
        chat, ranking, callback_manager, verbose. Anything else raises UnknownOptionError."""
        _check_options("FoTMemoryIndex.as_retriever", options, _RETRIEVER_OPTIONS)
        return FoTMemoryRetriever(self, **options)

    def as_query_engine(self, **options: Any) -> FoTMemoryQueryEngine:
        """A query engine over this index; options: memory_docs, chat, max_new_tokens, num_sources
        (or similarity_top_k: the same, the number of source nodes), answer_mode, ranking,
        streaming, callback_manager. Anything else raises UnknownOptionError."""
        _check_options("FoTMemoryIndex.as_query_engine", options, _QUERY_ENGINE_OPTIONS)
        if "similarity_top_k" in options:
            top_k = options.pop("similarity_top_k")
            if options.setdefault("num_sources", top_k) != top_k:
                raise ValueError(f"similarity_top_k={top_k} and num_sources={options['num_sources']} disagree: both "
                                 "are the number of source nodes; give one.")
        return FoTMemoryQueryEngine(index=self, **options)

    def as_chat_engine(self, chat_mode: str = "best", llm: Any = None, **options: Any) -> Any:
        """One of llama-index's chat engines over this index (as `BaseIndex.as_chat_engine` offers).

        chat_mode: "condense_question" (and "best"): the chat history and the new message are
        condensed into one question by the plain model, which the FoT query engine answers from
        memory, with sources; "context" / "condense_plus_context": this index's retriever puts
        the passages that draw memory attention into the chat prompt, answered by `llm` (default:
        this index's FoTMemoryLLM, attending to the same documents); "simple": `llm` alone.
        Options go to the query engine or retriever and to the chat engine's `from_defaults`
        (memory, chat_history, system_prompt, ...); anything else raises UnknownOptionError.
        """
        from llama_index.core.chat_engine import (
            CondensePlusContextChatEngine,
            CondenseQuestionChatEngine,
            ContextChatEngine,
            SimpleChatEngine,
        )

        chat_mode = getattr(chat_mode, "value", chat_mode)
        engines = {"best": CondenseQuestionChatEngine, "condense_question": CondenseQuestionChatEngine,
                   "context": ContextChatEngine, "condense_plus_context": CondensePlusContextChatEngine,
                   "simple": SimpleChatEngine}
        if chat_mode not in engines:
            raise ValueError(f"chat_mode {chat_mode!r} is not one of {', '.join(engines)}.")
        engine_cls = engines[chat_mode]
        own = _QUERY_ENGINE_OPTIONS if engine_cls is CondenseQuestionChatEngine else (
            _RETRIEVER_OPTIONS if engine_cls is not SimpleChatEngine else set())
        chat_options = {name for name in inspect.signature(engine_cls.from_defaults).parameters
                        if name not in ("kwargs", "llm", "retriever", "query_engine")}
        _check_options(f"FoTMemoryIndex.as_chat_engine(chat_mode={chat_mode!r})", options, own | chat_options)
        mine = {name: value for name, value in options.items() if name in own}
        theirs = {name: value for name, value in options.items() if name not in own}
        if engine_cls is CondenseQuestionChatEngine:
            # Streams, so that stream_chat works; chat() reads the stream to its end.
            engine = self.as_query_engine(**{"streaming": True, **mine})
            condenser = llm or self.as_llm(memory_docs=[], max_new_tokens=64)
            return engine_cls.from_defaults(query_engine=engine, llm=condenser, **theirs)
        if llm is None:  # the FoT LLM, attending to the documents the retriever searches
            llm = self.as_llm(memory_docs=self.resolve(mine.get("memory_docs")))
        if engine_cls is SimpleChatEngine:
            return engine_cls.from_defaults(llm=llm, **theirs)
        return engine_cls.from_defaults(retriever=self.as_retriever(**mine), llm=llm, **theirs)

    def as_llm(self, **options: Any) -> Any:
        """A FoTMemoryLLM sharing this index's model and store (memory_docs=[] for the plain model)."""
        from .llm import FoTMemoryLLM

        return FoTMemoryLLM(document_memory=self.memory, **options)

    def fit_question(self, text: str, *, chat: bool = False) -> str:
        """The tail of `text` that fits the local context as a question (retrievers get whole chats)."""
        engine = self.memory.engine
        room = engine.config.context_length - (len(engine.chat_prompt("")[0]) if chat else 0)
        ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= room else engine.tokenizer.decode(ids[-room:])


class FoTMemoryRetriever(BaseRetriever):
    """The passages that draw the most memory attention while the model reads the query."""

    def __init__(self, index: FoTMemoryIndex, *, similarity_top_k: int = 3, memory_docs: Sequence[str] | None = None,
                 chat: bool = False, ranking: Ranking = DEFAULT_RANKING,
                 callback_manager: CallbackManager | None = None, verbose: bool = False) -> None:
        self._index = index
        self.similarity_top_k = similarity_top_k
        self.ranking = ranking
        self.memory_docs = None if memory_docs is None else list(memory_docs)
        self.chat = chat
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        question = self._index.fit_question(query_bundle.query_str, chat=self.chat)
        sources = self._index.memory.find_sources(
            question, docs=self._index.resolve(self.memory_docs), chat=self.chat, num_sources=self.similarity_top_k,
            ranking=self.ranking,
        )
        return self._index.nodes(sources, self.ranking)


class FoTMemoryQueryEngine(CustomQueryEngine):
    """Answers from FoT memory; `source_nodes` are the passages that drew the most attention."""

    memory_docs: Optional[List[str]] = Field(
        default=None, description="Documents (names, store ids or llama-index ids) to attend to; None: all."
    )
    chat: bool = Field(
        default=False, description="Wrap the query in the chat template (the default model answers "
        "completion-style prompts far more reliably).",
    )
    max_new_tokens: int = Field(default=32, gt=0, description="The most tokens in an answer.")
    num_sources: int = Field(default=3, ge=0, description="Source nodes per response.")
    answer_mode: AnswerMode = Field(
        default=DEFAULT_ANSWER_MODE, description="'memory' (the memory layers attend while answering), "
        "'passages' (the passages the question draws attention to are put, as text, before it; memory "
        "detached) or 'reread' (the same, memory attached).",
    )
    ranking: Ranking = Field(default=DEFAULT_RANKING, description="Passage ranking: 'lift' or 'attention'.")
    streaming: bool = Field(
        default=False, description="Return a StreamingResponse whose response_gen yields the answer as it is "
        "generated; its source_nodes are filled when the stream ends (sources are ranked by the attention the "
        "whole answer drew).",
    )
    _index: FoTMemoryIndex = PrivateAttr()

    def __init__(self, *, index: FoTMemoryIndex, **fields: Any) -> None:
        super().__init__(**fields)
        self._index = index

    def custom_query(self, query_str: str) -> Response | StreamingResponse:
        def ask(on_text: Any = None) -> Answer:
            return ask_any_length(
                self._index.memory, query_str, docs=self._index.resolve(self.memory_docs), chat=self.chat,
                max_new_tokens=self.max_new_tokens, num_sources=self.num_sources, answer_mode=self.answer_mode,
                ranking=self.ranking, on_text=on_text,
            )

        metadata: dict[str, Any] = {"memory_docs": self.memory_docs}
        if not self.streaming:
            answer = ask()
            metadata["left_out"] = [item.to_dict() for item in answer.left_out]  # damaged documents, skipped
            return Response(response=answer.text, source_nodes=self._index.nodes(answer.sources, self.ranking),
                            metadata=metadata)
        nodes: list[NodeWithScore] = []

        def deltas() -> Iterator[str]:
            stripped = StrippedDeltas()
            for item in in_thread(ask):
                if isinstance(item, Answer):
                    nodes.extend(self._index.nodes(item.sources, self.ranking))
                    metadata["left_out"] = [left.to_dict() for left in item.left_out]
                    return
                delta = stripped.feed(item)
                if delta:
                    yield delta

        return StreamingResponse(response_gen=deltas(), source_nodes=nodes, metadata=metadata)


_RETRIEVER_OPTIONS = {"similarity_top_k", "memory_docs", "chat", "ranking", "callback_manager", "verbose"}
_QUERY_ENGINE_OPTIONS = {"memory_docs", "chat", "max_new_tokens", "num_sources", "similarity_top_k", "answer_mode",
                         "ranking", "streaming", "callback_manager"}
# llama-index options that exist elsewhere but mean nothing here, and what to use instead.
_NOT_APPLICABLE = {
    "response_mode": "A FoT answer is one generation from memory, not a synthesis over retrieved chunks: choose "
                     "answer_mode='memory', 'passages' or 'reread' instead of a response_mode.",
    "llm": "The index answers with its own model (the one its store recorded); as_llm() gives it as an LLM.",
    "text_qa_template": "Questions go to the model as they are (chat=True wraps them in the chat template).",
    "node_postprocessors": "Sources are ranked by memory attention (ranking='lift' or 'attention').",
}


def _check_options(where: str, options: dict[str, Any], accepted: set[str]) -> None:
    unknown = [name for name in options if name not in accepted]
    if unknown:
        hint = next((_NOT_APPLICABLE[name] for name in unknown if name in _NOT_APPLICABLE), "")
        raise UnknownOptionError(where, unknown, accepted, hint)


def _base_name(document: Document) -> str:
    name = os.path.basename(str(document.metadata.get("file_name") or "")) or document.id_
    return name.replace("/", "_").replace("\\", "_")


def _ref_doc_id(record: DocumentRecord) -> str | None:
    return (record.metadata.get(METADATA_KEY) or {}).get("ref_doc_id")


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata as SQLite stores it (JSON): values JSON cannot hold become strings."""
    return json.loads(json.dumps(metadata, default=str))


def _node(source: Source, record: DocumentRecord | None, ranking: Ranking) -> NodeWithScore:
    stored = (record.metadata.get(METADATA_KEY) or {}) if record is not None else {}
    node = TextNode(
        id_=f"{source.doc_id}:{source.start_char}",
        text=source.text,
        metadata={**stored.get("metadata", {}), "document": source.doc, "doc_id": source.doc_id,
                  "attention_share": source.weight, "lift": source.lift},
        start_char_idx=source.start_char,
        end_char_idx=source.end_char,
    )
    if stored.get("ref_doc_id"):
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=stored["ref_doc_id"])
    return NodeWithScore(node=node, score=source.lift if ranking == "lift" else source.weight)
