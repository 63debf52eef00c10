"""Importing a finished document from another store: how a distributed read lands in the target.

A Ray task (or any other process) reads a document into its own staging store; the single
writer of the target store then imports it. An import is a write like any other: it holds the
target's writer lock, copies the document's files into the target's `tmp/<random>/`, checks
their sizes and CRC-32 against the source record, fsyncs them, and publishes through
`DocumentWriter.commit` (rename into `docs/`, then ONE SQLite transaction with the row and
chunks), so a crash at any point leaves the target as it was. `ImportWriter` is a
`DocumentWriter` whose files come from the source's directory instead of from appends; every
other commit step is the writer's own.

Refused with DocumentImportError when the source store's fingerprint (model, memory config)
differs from the target's. Idempotent: a document whose text (sha256) the target already holds
is not copied again (unless force=True, which also replaces a document of the same name).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DocumentImportError, DuplicateDocumentError, FingerprintRequiredError
from .files import StoreLayout, crc32_file, file_stamp, fsync_file, kv_filename
from .hnsw_index import IndexParams
from .metadata import DocumentRecord, Metadata, fingerprint_differences
from .writer import ChunkSpan, DocumentWriter

if TYPE_CHECKING:
    from .store import MemoryStore

__all__ = ["ImportWriter", "import_document"]

logger = logging.getLogger(__name__)


class ImportWriter(DocumentWriter):
    """A DocumentWriter that publishes a copy of another store's finished document.

    The copy keeps the source's id (unless the target already uses it), creation time, record
    fields and chunks, so a document keeps its identity and its place in `documents()` order
    wherever it is imported.
    """

    def __init__(self, layout: StoreLayout, meta: Metadata, release_lock: Callable[[], None], *,
                 source_dir: Path, source: DocumentRecord, chunks: list[ChunkSpan],
                 fingerprint: dict[str, Any], force: bool) -> None:
        super().__init__(layout, meta, release_lock, name=source.name, source_path=source.source_path,
                         sha256=source.sha256, text_length=source.text_length, metadata=source.metadata,
                         dtype=source.dtype, index_params=IndexParams(), fingerprint=fingerprint, force=force)
        if source.id not in meta.known_ids() and not layout.doc_dir(source.id).exists():
            self.doc_id = source.id
        self._source_dir, self._source, self._source_chunks = source_dir, source, chunks
        self._kv_heads, self._head_dim = source.kv_heads, source.head_dim

    def append(self, layer: int, keys: Any, values: Any) -> None:
        raise TypeError("An ImportWriter copies a finished document; it takes no appends.")

    def _checked_layout(self) -> tuple[int, list[ChunkSpan]]:
        return self._source.num_tokens, sorted(self._source_chunks)

    def _copy(self, file_name: str) -> dict[str, Any]:
        """Copy one file into the temp directory, check it against the source record, fsync it."""
        expected = self._source.files[file_name]
        target = self._tmp / file_name
        shutil.copyfile(self._source_dir / file_name, target)
        size, crc = target.stat().st_size, crc32_file(target)
        if size != expected["size"] or crc != expected["crc32"]:
            raise DocumentImportError(
                f"Cannot import {self._source.name!r} (id {self._source.id}): its copy of {file_name} has "
                f"{size} bytes and CRC-32 {crc}, the source recorded {expected['size']} bytes and "
                f"{expected['crc32']}. The source document is damaged: read the file again."
            )
        fsync_file(target)
        return {"size": size, "crc32": crc, "stamp": file_stamp(target)}  # the copy's own: checked just now

    def _finish_kv_files(self) -> dict[str, dict[str, Any]]:
        return {kv_filename(layer): self._copy(kv_filename(layer)) for layer in self._source.layers}

    def _save_indexes(self, files: dict[str, dict[str, Any]]) -> dict[str, dict[str, list]]:
        for file_name in sorted(self._source.files):
            if file_name not in files:
                files[file_name] = self._copy(file_name)
        return dict(self._source.index_params.get("layers", {}))

    def _make_record(self, num_tokens: int, files: dict[str, dict[str, Any]],
                     summary: dict[str, dict[str, list]]) -> DocumentRecord:
        source = self._source
        return DocumentRecord(
            id=self.doc_id, name=source.name, source_path=source.source_path, sha256=source.sha256,
            num_tokens=source.num_tokens, created=source.created, metadata=source.metadata,
            text_length=source.text_length, dtype=source.dtype, kv_heads=source.kv_heads,
            head_dim=source.head_dim, layers=tuple(source.layers), index_params=dict(source.index_params),
            files=files,
        )


def import_document(target: MemoryStore, source: MemoryStore, id_or_name: str, *,
                    force: bool = False) -> tuple[DocumentRecord, bool]:
    """Copy one ready document of `source` into `target` atomically; returns (record, copied now).

    Raises DocumentImportError when the two stores' fingerprints differ, FingerprintRequiredError
    when neither the target nor the call knows one, DuplicateDocumentError when another text of
    the same name is stored (without force), StoreLockedError when another writer is active.
    """
    target._require_writable("import a document")
    record = source.document(id_or_name)
    if source.fingerprint is None:
        raise FingerprintRequiredError(str(source.path))
    if target.fingerprint is None:
        target.fingerprint, target._given_fingerprint = dict(source.fingerprint), True
    differences = fingerprint_differences(target.fingerprint, source.fingerprint)
    if differences:
        shown = "; ".join(f"{key}: target has {ours!r}, source has {theirs!r}" for key, ours, theirs in differences[:8])
        raise DocumentImportError(
            f"Cannot import {record.name!r} from {source.path} into {target.path}: it was read with another "
            f"model or memory configuration ({shown}). Read it with the target store's model and settings, "
            "or import it into a store of its own."
        )
    existing = target.find_by_sha256(record.sha256)
    if existing is not None and not force:
        logger.info("%s is already in %s as %s (%s); not imported again", record.name, target.path,
                    existing.name, existing.id)
        return existing, False
    for file_name in record.files:  # a damaged source refuses before anything is copied
        source._check_file(record, file_name, checksum=False)
    chunks = [(c.start_token, c.end_token, c.start_char, c.end_char, c.text) for c in source.chunks(record.id)]
    writer = _begin_import(target, source._layout.doc_dir(record.id), record, chunks, force)
    with writer:
        pass  # commit: the writer's own steps (files, fsync, rename, row last)
    assert writer.record is not None
    logger.info("imported document %r (%s) from %s", record.name, writer.record.id, source.path)
    return writer.record, True


def _begin_import(target: MemoryStore, source_dir: Path, record: DocumentRecord,
                  chunks: list[ChunkSpan], force: bool) -> ImportWriter:
    """Under the target's writer lock (held by the writer until commit or abort), as begin_document."""
    from .store import _Releaser

    lock = target._acquire_lock(target.lock_timeout)
    try:
        target._record_fingerprint()
        target._meta.raise_format_version()
        existing = target._meta.find("name", record.name)
        if existing and not force:
            raise DuplicateDocumentError(record.name, existing[0].id)
        assert target.fingerprint is not None
        return ImportWriter(target._layout, target._meta, _Releaser(lock), source_dir=source_dir,
                            source=record, chunks=chunks, fingerprint=target.fingerprint, force=force)
    except BaseException:
        lock.release()
        raise
