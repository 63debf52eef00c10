"""llama-index documents in a FoT memory store: reading, a retriever, a query engine, reopening.

`FoTMemoryIndex` reads `Document`s from any llama-index reader into a `DocumentMemory` store
(the persist directory), keeping each document's id and metadata in the store's SQLite
database. Its retriever returns, as `NodeWithScore`s, the passages that draw the most memory
attention while the model reads the question (the score is that share of memory attention);
its query engine answers from memory and cites the passages that drew the most attention while
the answer was generated. `from_persist_dir` reopens a store in any later process:
llama-index's `load_index_from_storage` cannot rebuild custom index classes.

    >>> documents = SimpleDirectoryReader(input_files=["novel.txt"]).load_data()   # doctest: +SKIP
    >>> index = FoTMemoryIndex.from_documents(documents, persist_dir="store")
    >>> response = index.as_query_engine().query("Netherfield Park is let at last, to a young man named Mr.")
    >>> response.source_nodes[0].node.text
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from typing import Any, List, Optional, Sequence

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.response.schema import Response
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
from ...documents.document_memory import DocumentMemory, Source
from ...persistence import DocumentRecord, StoreNotFoundError

__all__ = ["FoTMemoryIndex", "FoTMemoryRetriever", "FoTMemoryQueryEngine", "METADATA_KEY"]

logger = logging.getLogger(__name__)

METADATA_KEY = "llama_index"  # DocumentRecord.metadata[METADATA_KEY] = {"ref_doc_id", "metadata"}


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
        show_progress: bool = False,
    ) -> FoTMemoryIndex:
        """Open (or create) the store at `persist_dir` and read the documents not stored yet."""
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

    def insert_documents(self, documents: Sequence[Document], *, show_progress: bool = False) -> list[DocumentRecord]:
        """Read each document not stored yet (same text: skipped); returns their records in order.

        A document is named by its `file_name` metadata (else its id); names shared within the
        batch or with another stored document get the document id appended. A document whose
        id is already stored under its name with other text replaces that version.
        """
        named = Counter(_base_name(document) for document in documents)
        return [
            self.insert(document, name=_base_name(document) if named[_base_name(document)] == 1 else None,
                        show_progress=show_progress)
            for document in documents
        ]

    def insert(self, document: Document, *, name: str | None = None, show_progress: bool = False) -> DocumentRecord:
        """Read one llama-index Document into memory (skipped if its text is stored already)."""
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
            source_path=document.metadata.get("file_path"),
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

    # -- llama-index objects ----------------------------------------------------------------------

    def as_retriever(self, *, similarity_top_k: int = 3, memory_docs: Sequence[str] | None = None,
                     chat: bool = False, **kwargs: Any) -> FoTMemoryRetriever:
        return FoTMemoryRetriever(self, similarity_top_k=similarity_top_k, memory_docs=memory_docs, chat=chat, **kwargs)

    def as_query_engine(self, **fields: Any) -> FoTMemoryQueryEngine:
        """A query engine over this index; fields: memory_docs, chat, max_new_tokens, num_sources,
        answer_mode, ranking."""
        return FoTMemoryQueryEngine(index=self, **fields)

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
        default=DEFAULT_ANSWER_MODE, description="'memory' (the memory layers attend while answering) or "
        "'reread' (the passages the question draws attention to are put, as text, before it).",
    )
    ranking: Ranking = Field(default=DEFAULT_RANKING, description="Passage ranking: 'lift' or 'attention'.")
    _index: FoTMemoryIndex = PrivateAttr()

    def __init__(self, *, index: FoTMemoryIndex, **fields: Any) -> None:
        super().__init__(**fields)
        self._index = index

    def custom_query(self, query_str: str) -> Response:
        answer = self._index.memory.ask(
            query_str, docs=self._index.resolve(self.memory_docs), chat=self.chat,
            max_new_tokens=self.max_new_tokens, num_sources=self.num_sources, answer_mode=self.answer_mode,
            ranking=self.ranking,
        )
        nodes = self._index.nodes(answer.sources, self.ranking)
        left_out = [item.to_dict() for item in answer.left_out]  # damaged documents, skipped with a warning
        return Response(response=answer.text, source_nodes=nodes,
                        metadata={"memory_docs": self.memory_docs, "left_out": left_out})


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
