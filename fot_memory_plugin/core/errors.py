"""Every exception this package raises on purpose, importable from one place.

Adapters and persistence never import the core, so their exceptions are defined beside them and
re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..adapters.base import AdapterStateError, UnsupportedModelError
from ..persistence.errors import (
    CorruptDocumentError,
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

__all__ = [
    "FoTMemoryError",
    "UnsupportedModelError",
    "AdapterStateError",
    "ModelNotFoundError",
    "UnsupportedCheckpointError",
    "FunctionCallingUnsupportedError",
    "ConversationNameTakenError",
    "MissingDependencyError",
    "DocumentInputError",
    "NoDocumentsError",
    "QuestionTooLongError",
    "UnknownOptionError",
    "StorageContextError",
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
]


class FoTMemoryError(Exception):
    """Base class of the core's own errors."""


class ModelNotFoundError(FoTMemoryError, FileNotFoundError):
    """A model name or path that resolves to nothing on this machine."""


class DocumentInputError(FoTMemoryError, ValueError):
    """A document that cannot be read: missing, empty, binary or not UTF-8."""


class NoDocumentsError(FoTMemoryError, LookupError):
    """A question asked of a store that holds no documents."""


class QuestionTooLongError(FoTMemoryError, ValueError):
    """A question longer than the local context: read long material as a document instead."""


class UnsupportedCheckpointError(FoTMemoryError, ValueError):
    """A checkpoint in a known format (LongLLaMA) that uses a feature fot-memory cannot compute."""


class FunctionCallingUnsupportedError(FoTMemoryError, ValueError):
    """A use that needs an LLM which calls functions (FunctionAgent, chat_with_tools) given FoTMemoryLLM."""


class ConversationNameTakenError(FoTMemoryError, ValueError):
    """The name a conversation's next part needs belongs to another document."""


class MissingDependencyError(FoTMemoryError, ImportError):
    """An optional package a given model or feature needs is not installed."""


class UnknownOptionError(FoTMemoryError, TypeError):
    """An option that a llama-index object of this package does not take (it would vanish silently)."""

    def __init__(self, where: str, unknown: Sequence[str], accepted: Sequence[str], hint: str = "") -> None:
        self.unknown, self.accepted = list(unknown), sorted(accepted)
        super().__init__(f"{where} does not take {', '.join(map(repr, self.unknown))}; it takes "
                         f"{', '.join(self.accepted)}.{' ' + hint if hint else ''}")


class StorageContextError(FoTMemoryError, ValueError):
    """A llama-index StorageContext given to an index that keeps its documents in its own store."""
