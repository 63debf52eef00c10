"""MemoryStore: a directory of documents' memories, their metadata, and the writer lock.

```
STORE/
  memory.sqlite                  documents, chunks, meta (format version, model fingerprint)
  store.lock                     writer lock: one document write or forget at a time
  docs/<doc_id>/layer<L>.kv      keys and values of memory layer L (see kvfile.py)
  docs/<doc_id>/layer<L>.clusters.npz   cluster index of layer L (see cluster_index.py)
  docs/<doc_id>/layer<L>.h<H>.hnsw   or an hnswlib index over the keys of KV head H (see hnsw_index.py)
  docs/<doc_id>/layer<L>.h<H>.extra.npz   and its exact-list tokens, collapsed duplicates and centre
  docs/<doc_id>/manifest.json    its record and chunks: what `repair` rebuilds the database from
  tmp/<doc_id>/                  documents being written (with a writer marker)
  lost+found/                    directories `repair` could not account for (never deleted)
```

Readers need no lock (SQLite WAL, immutable document directories); a writer holds `store.lock`
while it writes one document, so only one process writes at a time.

Nothing is deleted unless the store can prove it is its own debris: a writer-side open removes
tmp/ directories that carry our writer marker and docs/ directories that the database lists as
pending (a crashed publication or removal). A document directory the database does not know is
left where it is, with a warning that points at `repair`; a missing or damaged memory.sqlite
beside document directories is an error, never a reason to clean up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import filelock
import numpy as np
from tqdm.auto import tqdm

from .errors import (
    CorruptDocumentError,
    DocumentNotFoundError,
    DuplicateDocumentError,
    FingerprintRequiredError,
    IncompatibleStoreError,
    StoreDatabaseMissingError,
    StoreDiskFullError,
    StoreLockedError,
    StoreNotFoundError,
    StoreReadOnlyError,
    StoreVersionError,
)
from .faults import check_store_path, free_bytes, translated
from .cluster_index import ClusterIndex, ClusterSearch
from .files import (
    MANIFEST_NAME,
    StoreLayout,
    clusters_filename,
    crc32_file,
    extras_filename,
    file_stamp,
    index_filename,
    kv_filename,
    remove_tree,
    validate_name,
)
from .manifest import Manifest, ManifestError, read_manifest, write_manifest
from .hnsw_index import HnswIndex, IndexExtras, IndexParams, num_threads
from .kvfile import STORAGE_DTYPES, kv_file_size, open_kv, rows_float32
from .memory import DEFAULT_EXACT_BELOW, DocumentLayer, PersistentMemory
from .metadata import (
    FORMAT_VERSION,
    Chunk,
    DocumentRecord,
    Metadata,
    fingerprint_differences,
    normalise_fingerprint,
)
from .writer import DocumentWriter

__all__ = ["MemoryStore"]

logger = logging.getLogger(__name__)

Verify = Literal["full", "always", "size"]


class MemoryStore:
    """A persistent memory store (a directory). Open with `MemoryStore.open(path, ...)`; a context manager.

    Example:
        with MemoryStore.open("store", fingerprint=fp) as store:
            with store.begin_document("book.txt", sha256=digest, text_length=n) as writer:
                for window in windows:  # per memory layer: keys, values (Hkv, T, D)
                    for layer, (keys, values) in window.items():
                        writer.append(layer, keys, values)
                writer.add_chunks(spans)
            hits = store.memory(layer=3).search(queries, k=128)  # queries (1, Hq, T, D)
    """

    def __init__(self, layout: StoreLayout, meta: Metadata, *, fingerprint: dict[str, Any] | None,
                 given_fingerprint: bool, readonly: bool, lock_timeout: float, verify: Verify,
                 held_lock: filelock.BaseFileLock | None = None) -> None:
        self._layout, self._meta = layout, meta
        self.fingerprint = fingerprint
        self._given_fingerprint = given_fingerprint
        self.readonly, self.lock_timeout, self.verify_mode = readonly, lock_timeout, verify
        self._loaded: dict[tuple[str, int], DocumentLayer] = {}
        self._verified: set[tuple[str, str]] = set()  # (doc id, file name) whose checksum matched
        self._warned_legacy: set[str] = set()  # format-1 documents already warned about
        self._chunk_spans: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._load_lock = threading.Lock()
        self._held_lock = held_lock  # the writer lock, when opened with hold_lock=True
        self._closed = False

    # ---- opening and closing -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: dict[str, Any] | None = None,
        create: bool = True,
        readonly: bool = False,
        lock_timeout: float = 1.0,
        verify: Verify = "full",
        hold_lock: bool = False,
        shared: bool = False,
    ) -> MemoryStore:
        """Open (or create) the store at `path`.

        fingerprint: what the memory was computed with (model id, config hash, memory config,
            num_kv_heads, head_dim, mem_layers), JSON-able. Recorded by the first document write;
            an open with a different one raises IncompatibleStoreError. None: use the recorded one
            (enough for searching; writing needs it; `bind_fingerprint` can give it later).
        create: make a new store when there is none. readonly: never write, lock or clean up.
        lock_timeout: seconds a writer waits for another writer before StoreLockedError.
        verify: "full" makes sure of every file's CRC-32 before its first use in this process:
            it is read again, unless the file is untouched since the writer computed it (same
            inode, mtime and ctime: `file_stamp`), so a byte changed by any write is found before
            it answers and `verify()` finds what the disk itself damaged; "always" reads every
            file's CRC-32 before first use, untouched or not; "size" checks sizes only, except
            index files, which are always checksummed (hnswlib can crash on a damaged file).
            Sizes are always checked.
        hold_lock: take the writer lock now and keep it until close (a CLI checks it before it
            spends time loading a model); writes and forgets of this store then use it.
        shared: a NEW store's files get the process's umask instead of owner-only permissions
            (0600 / 0700), for stores other users read. An existing store keeps what it has.
        """
        if verify not in ("full", "always", "size"):
            raise ValueError(f"verify must be 'full', 'always' or 'size', got {verify!r}.")
        root = Path(path).expanduser().absolute()
        check_store_path(root)
        layout = StoreLayout(root, private=cls._is_private(root, shared))
        with translated(root, "open"):
            if not layout.sqlite.exists():
                cls._refuse_lost_database(layout)
                if readonly or not create:
                    raise StoreNotFoundError(str(layout.root))
                layout.make_dirs()
            lock = cls._take_lock(layout, lock_timeout) if hold_lock and not readonly else None
            try:
                return cls._open_meta(layout, fingerprint, readonly, lock_timeout, verify, lock)
            except BaseException:
                if lock is not None:
                    lock.release()
                raise

    @classmethod
    def _open_meta(cls, layout: StoreLayout, fingerprint: dict[str, Any] | None, readonly: bool,
                   lock_timeout: float, verify: Verify, lock: filelock.BaseFileLock | None) -> MemoryStore:
        meta = Metadata(layout.sqlite, readonly=readonly, private=layout.private)
        try:
            if meta.format_version() is None:  # an empty database (truncated to nothing, say)
                cls._refuse_lost_database(layout)
            stored_fp = cls._check_meta(layout, meta, readonly)
            given = normalise_fingerprint(fingerprint) if fingerprint is not None else None
            if given is not None and stored_fp is not None:
                differences = fingerprint_differences(stored_fp, given)
                if differences:
                    raise IncompatibleStoreError(str(layout.root), differences)
        except BaseException:
            meta.close()
            raise
        store = cls(layout, meta, fingerprint=stored_fp if stored_fp is not None else given,
                    given_fingerprint=given is not None,
                    readonly=readonly, lock_timeout=lock_timeout, verify=verify, held_lock=lock)
        if not readonly:
            try:
                store._clean_up_if_unlocked()
            except BaseException:
                store.close()
                raise
        return store

    @staticmethod
    def _is_private(root: Path, shared: bool) -> bool:
        """A new store is private unless shared; an existing one stays as its root directory is."""
        if root.is_dir() and (root / "memory.sqlite").exists():
            return not root.stat().st_mode & 0o077
        return not shared

    @staticmethod
    def _refuse_lost_database(layout: StoreLayout) -> None:
        """No memory.sqlite: fine for a new store, an error if docs/ still holds documents."""
        if layout.docs.is_dir():
            directories = [entry for entry in layout.docs.iterdir() if entry.is_dir()]
            if directories:
                raise StoreDatabaseMissingError(str(layout.root), len(directories))

    @staticmethod
    def _take_lock(layout: StoreLayout, timeout: float) -> filelock.BaseFileLock:
        """A NEW lock object each time: flock conflicts even with another writer in this process."""
        mode = {"mode": 0o600} if layout.private else {}
        lock = filelock.FileLock(str(layout.lock), thread_local=False, **mode)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise StoreLockedError(str(layout.root), timeout) from None
        return lock

    @staticmethod
    def _check_meta(layout: StoreLayout, meta: Metadata, readonly: bool) -> dict[str, Any] | None:
        """Check the format version (creating the schema if writable); returns the recorded fingerprint."""
        version = meta.format_version()
        if version is not None and version > FORMAT_VERSION:
            raise StoreVersionError(str(layout.root), version, FORMAT_VERSION)
        if not readonly:
            meta.ensure_schema()
            layout.make_dirs()
        recorded = meta.get_meta("fingerprint")
        return None if recorded is None else normalise_fingerprint(json.loads(recorded))

    def close(self) -> None:
        """Close the database and drop cached indexes; memories already made keep working."""
        if not self._closed:
            self._closed = True
            self._meta.close()
            self._loaded.clear()
            if self._held_lock is not None:
                self._held_lock.release()
                self._held_lock = None

    def bind_fingerprint(self, fingerprint: dict[str, Any]) -> None:
        """Give the fingerprint of the model that will write (after opening without one, to load
        the model only once the store is known to be usable). IncompatibleStoreError if it
        differs from the recorded one."""
        given = normalise_fingerprint(fingerprint)
        recorded = self._meta.get_meta("fingerprint")
        if recorded is not None:
            differences = fingerprint_differences(normalise_fingerprint(json.loads(recorded)), given)
            if differences:
                raise IncompatibleStoreError(str(self.path), differences)
        self.fingerprint, self._given_fingerprint = given, True

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._layout.root

    def __repr__(self) -> str:
        return f"MemoryStore({str(self.path)!r}, readonly={self.readonly})"

    # ---- the writer lock and clean-up ----------------------------------------------------

    def _acquire_lock(self, timeout: float) -> filelock.BaseFileLock | _HeldLock:
        """The writer lock: the one this store holds (hold_lock=True), else a new one."""
        if self._held_lock is not None:
            return _HeldLock()
        return self._take_lock(self._layout, timeout)

    def _clean_up_if_unlocked(self) -> None:
        """Remove leftovers of crashed writers, but only if no writer is running now, and only
        what the store can prove is its own (see the module docstring)."""
        try:
            lock = self._acquire_lock(timeout=0)
        except StoreLockedError:
            logger.debug("a writer is active in %s; clean-up skipped", self.path)
            return
        try:
            with translated(self.path, "clean up"):
                self._remove_unfinished_writes()
                self._remove_pending_directories()
                self._warn_unknown_directories()
                self._write_missing_manifests()
        finally:
            lock.release()

    def _remove_unfinished_writes(self) -> None:
        for leftover in sorted(self._layout.tmp.iterdir()):
            if self._layout.is_own_debris(leftover):
                logger.warning("removing unfinished write %s (a writer crashed)", leftover)
                remove_tree(leftover)
            else:
                logger.warning("leaving %s alone: fot-memory did not write it (move it out of tmp/)", leftover)

    def _remove_pending_directories(self) -> None:
        """Directories of a publication or removal that did not finish (the database lists them)."""
        known = self._meta.known_ids()
        for doc_id, action in sorted(self._meta.pending().items()):
            directory = self._layout.doc_dir(doc_id)
            if doc_id in known:  # its row is committed: nothing to undo
                self._meta.clear_pending(doc_id)
                continue
            if directory.exists():
                verb = "unpublished write" if action == "write" else "forgotten or replaced document"
                logger.warning("removing %s: the %s of a writer that crashed", directory, verb)
                remove_tree(directory)
            if not directory.exists():
                self._meta.clear_pending(doc_id)

    def _warn_unknown_directories(self) -> None:
        known = self._meta.known_ids()
        for directory in sorted(self._layout.docs.iterdir()):
            if directory.name not in known:
                logger.warning("%s belongs to no document in the database and is left as it is: run "
                               "`fot-memory repair --store %s` to restore it or move it to lost+found/",
                               directory, self.path)

    def _write_missing_manifests(self) -> None:
        """Documents stored before manifests existed get one, so `repair` can restore them too."""
        fingerprint = self.fingerprint or {}
        for record in self._meta.documents():
            directory = self._layout.doc_dir(record.id)
            if directory.is_dir() and not (directory / MANIFEST_NAME).exists():
                chunks = [(c.start_token, c.end_token, c.start_char, c.end_char, c.text)
                          for c in self._meta.chunks(record.id)]
                write_manifest(self._layout, directory, Manifest(record, chunks, fingerprint,
                                                                 self._meta.format_version() or 0))

    def _require_writable(self, action: str) -> None:
        if self.readonly:
            raise StoreReadOnlyError(str(self.path), action)

    # ---- writing -------------------------------------------------------------------------

    def begin_document(
        self,
        name: str,
        *,
        source_path: str | os.PathLike[str] | None = None,
        sha256: str,
        text_length: int,
        metadata: dict[str, Any] | None = None,
        dtype: str = "float16",
        force: bool = False,
        index_params: IndexParams | None = None,
        threads: int = 1,
        expected_bytes: int | None = None,
        index_device: str | None = None,
    ) -> DocumentWriter:
        """Start writing a document; returns a DocumentWriter holding the writer lock.

        sha256: hex digest of the source text (see find_by_sha256). dtype: element type of the
        stored keys and values ("float16", "float32" or "bfloat16"). force: replace a document
        of the same name (atomically, at commit). threads: background threads writing and
        indexing (each takes some of the files and (layer, KV head) indexes): 1 beside a model
        computing on the CPU, more when it runs on a GPU. index_device: where cluster indexes are
        computed at commit (a torch device; default the CPU). expected_bytes: the document's size on
        disk if known (`estimate_document_bytes`), for the message of a StoreDiskFullError. Raises StoreLockedError after
        lock_timeout seconds if another writer is active, DuplicateDocumentError (at commit too)
        without force.
        """
        self._require_writable("write a document")
        if not self._given_fingerprint:
            raise FingerprintRequiredError(str(self.path))
        name = validate_name(name)
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
        if not isinstance(sha256, str) or not sha256:
            raise ValueError("sha256 must be the hex digest of the document's text.")
        if isinstance(text_length, bool) or not isinstance(text_length, int) or text_length < 0:
            raise ValueError(f"text_length must be an int >= 0, got {text_length!r}.")
        metadata = normalise_fingerprint(metadata or {})  # same JSON check as for fingerprints
        lock = self._acquire_lock(self.lock_timeout)
        try:
            with translated(self.path, "write a document into"):
                self._record_fingerprint()
                self._meta.raise_format_version()
                existing = self._meta.find("name", name)
                if existing and not force:
                    raise DuplicateDocumentError(name, existing[0].id)
                assert self.fingerprint is not None
                return DocumentWriter(
                    self._layout, self._meta, _Releaser(lock), name=name,
                    source_path=None if source_path is None else str(source_path), sha256=sha256,
                    text_length=text_length, metadata=metadata, dtype=dtype,
                    index_params=index_params or IndexParams(), fingerprint=self.fingerprint, force=force,
                    threads=threads, expected_bytes=expected_bytes, index_device=index_device,
                )
        except BaseException:
            lock.release()
            raise

    def require_space(self, needed_bytes: int) -> None:
        """StoreDiskFullError now, before any work, if the store's disk has less free space."""
        free = free_bytes(self.path)
        if free is not None and free < needed_bytes:
            raise StoreDiskFullError(str(self.path), needed_bytes, free)

    def _record_fingerprint(self) -> None:
        """Under the writer lock: record our fingerprint, or check it against one recorded meanwhile."""
        assert self.fingerprint is not None
        recorded = self._meta.record_fingerprint(self.fingerprint)
        differences = fingerprint_differences(recorded, self.fingerprint)
        if differences:
            raise IncompatibleStoreError(str(self.path), differences)

    def import_document(self, source: MemoryStore, id_or_name: str, *, force: bool = False) -> tuple[DocumentRecord, bool]:
        """Copy a ready document of another store (same fingerprint) into this one; returns (record, copied now).

        The same commit as a read (temp dir, fsync, rename, row last; see importing.py), under this
        store's writer lock. The document keeps its id and creation time. A text (sha256) already
        stored is not copied again unless force=True. Raises DocumentImportError on another model
        or memory configuration.
        """
        from .importing import import_document

        return import_document(self, source, id_or_name, force=force)

    def forget(self, id_or_name: str) -> DocumentRecord:
        """Remove a document: its row first (one transaction that lists its directory as pending
        removal), then its directory. Returns its record. Processes already answering from it
        keep their open files."""
        self._require_writable("forget a document")
        lock = self._acquire_lock(self.lock_timeout)
        try:
            with translated(self.path, "forget a document in"):
                record = self.document(id_or_name)
                self._meta.delete_document(record.id)
                remove_tree(self._layout.doc_dir(record.id))
                if not self._layout.doc_dir(record.id).exists():
                    self._meta.clear_pending(record.id)
        finally:
            lock.release()
        with self._load_lock:
            for key in [key for key in self._loaded if key[0] == record.id]:
                del self._loaded[key]
        logger.info("forgot document %r (%s)", record.name, record.id)
        return record

    def reindex(self, id_or_name: str, *, window: int, index_params: IndexParams | None = None,
                progress: bool = False) -> DocumentRecord:
        """Rebuild a document's indexes (cluster or hnswlib, as `index_params` says) from its
        stored keys, without the model.

        For documents indexed by an older fot-memory (or with other `index_params`). The keys and
        values are fed again, `window` tokens per append (the local window they were read with,
        so window starts are where they were), to a new document of the same name that replaces
        the old one at commit, as any write does: a crash leaves the old document as it was.
        The document gets a new id. Returns its record. progress: a bar of tokens on stderr.
        """
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be the local window the document was read with (an int >= 1), "
                             f"got {window!r}.")
        record = self.document(id_or_name)
        parts = {layer: self._load_layer(record, layer, need_index=False) for layer in record.layers}
        chunks = [(c.start_token, c.end_token, c.start_char, c.end_char, c.text) for c in self._meta.chunks(record.id)]
        with self.begin_document(record.name, source_path=record.source_path, sha256=record.sha256,
                                 text_length=record.text_length, metadata=record.metadata, dtype=record.dtype,
                                 force=True, index_params=index_params,
                                 threads=num_threads()) as writer:  # no model to leave cores for
            with tqdm(total=record.num_tokens, unit="tok", desc=f"re-indexing {record.name}", disable=not progress,
                      leave=False) as bar:
                for start in range(0, record.num_tokens, window):
                    for layer, part in parts.items():
                        rows = rows_float32(part.kv[start : start + window], record.dtype)  # (T, 2, Hkv, D)
                        writer.append(layer, rows[:, 0].transpose(0, 1), rows[:, 1].transpose(0, 1))
                    bar.update(min(window, record.num_tokens - start))
            writer.add_chunks(chunks)
        assert writer.record is not None
        with self._load_lock:
            for key in [key for key in self._loaded if key[0] == record.id]:
                del self._loaded[key]
        logger.info("re-indexed document %r: %s -> %s", record.name, record.id, writer.record.id)
        return writer.record

    # ---- reading metadata ----------------------------------------------------------------

    def documents(self) -> list[DocumentRecord]:
        """Every ready document, oldest first."""
        return self._meta.documents()

    def document(self, id_or_name: str) -> DocumentRecord:
        """The document with this id, else this name; DocumentNotFoundError if neither."""
        found = self._meta.find("id", id_or_name) or self._meta.find("name", id_or_name)
        if not found:
            raise DocumentNotFoundError(id_or_name, [record.name for record in self.documents()])
        return found[0]

    def find_by_sha256(self, sha256: str) -> DocumentRecord | None:
        """The newest ready document read from a text with this SHA-256, if any."""
        found = self._meta.find("sha256", sha256)
        return found[-1] if found else None

    def info(self) -> dict[str, Any]:
        """Summary: path, format version, fingerprint, documents, total tokens, bytes on disk (the
        database and ready documents; unfinished writes apart), damaged documents (by size)."""
        records = self.documents()
        known = {record.id for record in records}
        docs = [entry for entry in self._layout.docs.iterdir()] if self._layout.docs.is_dir() else []
        size = _tree_bytes([self._layout.root / name for name in os.listdir(self.path)
                            if name.startswith("memory.sqlite")] + [d for d in docs if d.name in known])
        return {
            "path": str(self.path), "format_version": self._meta.format_version() or FORMAT_VERSION,
            "fingerprint": self.fingerprint, "documents": len(records),
            "total_tokens": sum(record.num_tokens for record in records), "bytes_on_disk": size,
            "unfinished_write_bytes": _tree_bytes([self._layout.tmp]),
            "unknown_directories": sorted(d.name for d in docs if d.name not in known),
            "damaged_documents": sorted(self.document(doc_id).name for doc_id in self.verify(checksum=False)),
        }

    def chunks(self, id_or_name: str, token_indices: Sequence[int] | np.ndarray | None = None) -> list[Chunk]:
        """A document's text chunks in order: all, or those containing any of token_indices."""
        record = self.document(id_or_name)
        if token_indices is None:
            return list(self._meta.chunks(record.id))
        if record.id not in self._chunk_spans:
            self._chunk_spans[record.id] = self._meta.chunk_starts(record.id)
        starts, ends = self._chunk_spans[record.id]
        if len(starts) == 0:
            return []
        tokens = np.asarray(token_indices, dtype=np.int64).reshape(-1)
        position = np.searchsorted(starts, tokens, side="right") - 1  # last chunk starting at or before
        inside = (position >= 0) & (tokens < ends[np.clip(position, 0, None)])
        return list(self._meta.chunks(record.id, np.unique(position[inside]).tolist()))

    # ---- integrity -----------------------------------------------------------------------

    def derived(self, key: str) -> bytes | None:
        """What `keep_derived` kept under `key` (None if nothing, or if it fails its CRC-32);
        cleared whenever a document is added or removed."""
        return self._meta.get_derived(key)

    def keep_derived(self, key: str, value: bytes, *, lock_timeout: float | None = None) -> None:
        """Keep `value`, computed from the documents alone, for later processes (DocumentMemory
        keeps the baseline probe's chunk shares). Under the writer lock (waiting at most
        lock_timeout, default the store's, then StoreLockedError), one short transaction."""
        self._require_writable("keep derived data in")
        lock = self._acquire_lock(self.lock_timeout if lock_timeout is None else lock_timeout)
        try:
            self._meta.put_derived(key, value)
        finally:
            lock.release()

    def verify(self, id_or_name: str | None = None, *, checksum: bool = True, progress: bool = False) -> dict[str, str]:
        """Check every file of one or all documents, indexes and manifest included: sizes, and
        with checksum=True their CRC-32 (read again, not trusted from an earlier check).
        Returns {doc id: problem} for the damaged ones. progress: a bar of bytes on stderr."""
        records = self.documents() if id_or_name is None else [self.document(id_or_name)]
        problems: dict[str, str] = {}
        total = sum(file["size"] for record in records for file in record.files.values())
        with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", disable=not progress, leave=False) as bar:
            for record in records:
                try:
                    if checksum:
                        self._verified = {key for key in self._verified if key[0] != record.id}
                    for file_name, file in record.files.items():
                        self._check_file(record, file_name, checksum=checksum, trust_stamp=False)
                        bar.update(file["size"])
                    if checksum:
                        self._check_manifest(record)
                except CorruptDocumentError as error:
                    problems[record.id] = error.problem
        return problems

    def _check_manifest(self, record: DocumentRecord) -> None:
        """A manifest, where there is one, must be sound and describe this record."""
        directory = self._layout.doc_dir(record.id)
        if not (directory / MANIFEST_NAME).exists():
            return  # stored before manifests: the next writer-side open writes one
        try:
            manifest = read_manifest(directory)
        except ManifestError as error:
            raise CorruptDocumentError(record.id, record.name, str(error)) from None
        if manifest.record.to_row() != record.to_row():
            raise CorruptDocumentError(record.id, record.name, f"{MANIFEST_NAME} describes another document")

    def usable(self, records: Sequence[DocumentRecord]) -> tuple[list[DocumentRecord], dict[str, str]]:
        """Split documents into those whose files all check out (sizes, and checksums as `verify`
        mode says; every index too, even of documents searched exactly) and {id: problem} of
        the damaged ones, so a question over many documents can leave the damaged out."""
        def problem(job: tuple[DocumentRecord, str]) -> str | None:
            record, file_name = job
            checksum = self.verify_mode != "size" or _always_checksummed(file_name)
            try:
                self._check_file(record, file_name, checksum=checksum)
            except CorruptDocumentError as error:
                return error.problem
            return None

        jobs = [(record, file_name) for record in records for file_name in record.files]
        # Checksums on every core (zlib releases the GIL): a 1M-token 5-layer store is 3.8 GB of .kv.
        with ThreadPoolExecutor(max_workers=max(1, min(num_threads(), len(jobs)))) as pool:
            problems = list(pool.map(problem, jobs))
        damaged: dict[str, str] = {}
        for (record, _), found in zip(jobs, problems):
            if found is not None:
                damaged.setdefault(record.id, found)  # the first problem in the record's file order
        return [record for record in records if record.id not in damaged], damaged

    def _check_file(self, record: DocumentRecord, file_name: str, *, checksum: bool,
                    trust_stamp: bool | None = None) -> Path:
        """Path of one of a document's files after checking its size (and CRC-32 once per process).
        trust_stamp: skip reading the CRC-32 of a file untouched since it was written (default:
        as the verify mode says)."""
        path = self._layout.doc_dir(record.id) / file_name
        expected = record.files.get(file_name)
        if expected is None:
            raise CorruptDocumentError(record.id, record.name, f"its record lists no file {file_name}")
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if not self._meta.find("id", record.id):  # forgotten meanwhile
                raise DocumentNotFoundError(record.name, [r.name for r in self.documents()]) from None
            raise CorruptDocumentError(record.id, record.name, f"{file_name} is missing") from None
        if size != expected["size"]:
            raise CorruptDocumentError(record.id, record.name,
                                       f"{file_name} has {size} bytes, {expected['size']} were written")
        if trust_stamp is None:
            trust_stamp = self.verify_mode != "always"
        if checksum and (record.id, file_name) not in self._verified:
            untouched = (trust_stamp and _stamp_may_be_trusted(file_name) and expected.get("stamp") is not None
                         and file_stamp(path) == expected["stamp"])
            if not untouched and crc32_file(path) != expected["crc32"]:
                raise CorruptDocumentError(record.id, record.name, f"{file_name} differs from its checksum")
            self._verified.add((record.id, file_name))
        return path

    # ---- searching -----------------------------------------------------------------------

    def memory(
        self,
        layer: int,
        doc_ids: Sequence[str | DocumentRecord] | None = None,
        *,
        ef: int | None = None,
        exact: bool = False,
        exact_below: int = DEFAULT_EXACT_BELOW,
        cluster_search: ClusterSearch | None = None,
    ) -> PersistentMemory:
        """A searchable memory of one layer over some documents (ids or names; None = all ready ones).

        ef: hnswlib search breadth (default `default_ef(k)`, always >= k). cluster_search: how documents
        with cluster indexes are searched (default ClusterSearch(): 5% of the clusters per query row, at
        most 20% per search). exact: scan every key instead of
        using the indexes (the reference path). exact_below: documents shorter than this many
        tokens are scanned exactly anyway (faster there). A damaged document raises
        CorruptDocumentError naming it; a memory over the other documents still works.
        """
        if isinstance(doc_ids, str):
            raise TypeError(f"doc_ids must be a list of ids or names, got the string {doc_ids!r}; "
                            f"use [{doc_ids!r}].")
        records = self.documents() if doc_ids is None else [
            key if isinstance(key, DocumentRecord) else self.document(key) for key in doc_ids]
        if len({record.id for record in records}) != len(records):
            raise ValueError(f"doc_ids {list(doc_ids or [])} name a document twice: list each once.")
        need_index = not exact
        parts = [self._load_layer(record, layer, need_index and record.num_tokens >= exact_below)
                 for record in records]
        kv_heads, head_dim = self._shape_of(records)
        return PersistentMemory(layer, parts, kv_heads=kv_heads, head_dim=head_dim, ef=ef, exact=exact,
                                exact_below=exact_below, cluster_search=cluster_search)

    def _shape_of(self, records: list[DocumentRecord]) -> tuple[int | None, int | None]:
        """(Hkv, D) shared by the documents, else as the fingerprint says (None if unknown)."""
        shapes = {(record.kv_heads, record.head_dim) for record in records}
        if len(shapes) > 1:
            raise IncompatibleStoreError(str(self.path), [("kv_heads, head_dim", sorted(shapes), "one shape")])
        if shapes:
            return next(iter(shapes))
        fingerprint = self.fingerprint or {}
        return fingerprint.get("num_kv_heads"), fingerprint.get("head_dim")

    def _load_layer(self, record: DocumentRecord, layer: int, need_index: bool) -> DocumentLayer:
        """One document's layer, memory-mapped (and its indexes loaded if needed); cached per store."""
        if layer not in record.layers:
            raise ValueError(f"Document {record.name!r} has no memory for layer {layer}; it stores layers "
                             f"{list(record.layers)}.")
        with self._load_lock:
            part = self._loaded.get((record.id, layer))
            if part is None:
                name = kv_filename(layer)
                path = self._check_file(record, name, checksum=self.verify_mode != "size")
                assert record.files[name]["size"] == kv_file_size(record.num_tokens, record.kv_heads,
                                                                   record.head_dim, record.dtype)
                kv = open_kv(path, record.num_tokens, record.kv_heads, record.head_dim, record.dtype)
                part = DocumentLayer(record.id, record.name, kv, record.dtype, None)
            if need_index and part.indexes is None:
                if index_kind(record) == "clusters":
                    clusters = self._load_clusters(record, layer)
                    part.indexes = [clusters.head(head) for head in range(record.kv_heads)]
                else:
                    part.indexes = [self._load_index(record, layer, head) for head in range(record.kv_heads)]
            self._loaded[(record.id, layer)] = part
            return part

    def _load_clusters(self, record: DocumentRecord, layer: int) -> ClusterIndex:
        path = self._check_file(record, clusters_filename(layer), checksum=True)  # small: always checked
        try:
            return ClusterIndex.load(path, record.num_tokens, record.kv_heads, record.head_dim)
        except (ValueError, KeyError, OSError, EOFError) as error:
            raise CorruptDocumentError(record.id, record.name, f"{path.name} cannot be loaded ({error})") from error

    def _load_index(self, record: DocumentRecord, layer: int, head: int) -> HnswIndex:
        path = self._check_file(record, index_filename(layer, head), checksum=True)
        extras_name = extras_filename(layer, head)
        try:
            if extras_name in record.files:
                extras = IndexExtras.load(self._check_file(record, extras_name, checksum=True))
            else:  # indexed by format 1: raw keys, no exact list, no collapsed duplicates
                if record.id not in self._warned_legacy:
                    self._warned_legacy.add(record.id)
                    logger.warning("document %r was indexed by an older fot-memory (format 1): its hnswlib "
                                   "recall on real keys is low; read it again with force to re-index it",
                                   record.name)
                extras = IndexExtras.none(record.head_dim)
            return HnswIndex.load(path, extras, record.head_dim, record.num_tokens)
        except (RuntimeError, ValueError, MemoryError, OSError, KeyError) as error:
            raise CorruptDocumentError(record.id, record.name, f"{path.name} cannot be loaded ({error})") from error


class _HeldLock:
    """Stands for the store's held writer lock where a new lock would be taken: releasing it
    leaves the store's lock held."""

    def release(self) -> None:
        pass


class _Releaser:
    """Releases a writer lock once (a writer may both abort and exit)."""

    def __init__(self, lock: filelock.BaseFileLock) -> None:
        self._lock: filelock.BaseFileLock | None = lock

    def __call__(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def index_kind(record: DocumentRecord) -> str:
    """"clusters" or "hnsw": how a document's keys are indexed (documents before cluster indexes: hnsw)."""
    return record.index_params.get("kind", "hnsw")


def _stamp_may_be_trusted(file_name: str) -> bool:
    """hnswlib graphs are checksummed before every first use, stamp or not: a damaged one can crash
    the process, not just answer wrong."""
    return not file_name.endswith(".hnsw")


def _always_checksummed(file_name: str) -> bool:
    """Index files are checksummed before use even in "size" mode: hnswlib can crash on a damaged
    graph, and cluster indexes are small."""
    return file_name.endswith((".hnsw", ".clusters.npz"))


def _tree_bytes(paths: Sequence[Path]) -> int:
    """Bytes in these files and directory trees (links not followed)."""
    total = 0
    for path in paths:
        if path.is_symlink() or not path.exists():
            continue
        if path.is_file():
            total += path.stat().st_size
            continue
        for folder, _, files in os.walk(path):
            total += sum((Path(folder) / name).lstat().st_size for name in files)
    return total
