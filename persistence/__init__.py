"""The persistent FoT memory store: per-document hnswlib indexes and memory-mapped keys/values,
with SQLite metadata. Depends only on numpy, torch, hnswlib, sqlite-utils and filelock; the
core (`fot_memory_plugin`) wraps it, never the other way round.

Import it as `fot_memory_plugin.persistence`.
"""

from .errors import (
    CorruptDocumentError,
    DocumentImportError,
    DocumentNotFoundError,
    DuplicateDocumentError,
    FingerprintRequiredError,
    IncompatibleStoreError,
    InvalidDocumentNameError,
    StoreDatabaseError,
    StoreDatabaseMissingError,
    StoreDiskFullError,
    StoreError,
    StoreLockedError,
    StoreNotFoundError,
    StorePathError,
    StorePermissionError,
    StoreReadOnlyError,
    StoreVersionError,
)
from .hnsw_index import IndexParams, default_ef, num_threads
from .memory import DEFAULT_EXACT_BELOW, PersistentHits, PersistentMemory
from .metadata import FORMAT_VERSION, Chunk, DocumentRecord
from .repair import RepairReport, repair_store
from .store import MemoryStore
from .writer import DocumentWriter

__all__ = [
    "MemoryStore",
    "repair_store",
    "RepairReport",
    "DocumentWriter",
    "PersistentMemory",
    "PersistentHits",
    "DocumentRecord",
    "Chunk",
    "IndexParams",
    "default_ef",
    "num_threads",
    "DEFAULT_EXACT_BELOW",
    "FORMAT_VERSION",
    "StoreError",
    "StoreNotFoundError",
    "StoreLockedError",
    "StoreReadOnlyError",
    "IncompatibleStoreError",
    "FingerprintRequiredError",
    "StoreVersionError",
    "CorruptDocumentError",
    "DocumentNotFoundError",
    "InvalidDocumentNameError",
    "DuplicateDocumentError",
    "StoreDatabaseError",
    "StoreDatabaseMissingError",
    "StoreDiskFullError",
    "StorePathError",
    "StorePermissionError",
    "DocumentImportError",
]
