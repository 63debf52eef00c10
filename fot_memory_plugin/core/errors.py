"""Every exception this package raises on purpose, importable from one place.

Adapters and persistence never import the core, so their exceptions are defined beside them and
re-exported here.
"""

from __future__ import annotations

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
