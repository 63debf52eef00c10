"""One exception per failure a user of the store can hit; each message says what to do.

Every class subclasses `StoreError`, so callers (the core re-exports these) can catch them all
at once. Where a builtin exception fits too, it is a second base (for example `KeyError` for an
unknown document), so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
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


class StoreError(Exception):
    """Base class of every error the persistent memory store raises on purpose."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store at the given path, and the caller asked not to create one."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"No memory store at {path}: read a document into it first, or open it with create=True "
            "(and readonly=False) to make a new one."
        )


class StoreLockedError(StoreError):
    """Another writer (this or another process) holds the store's writer lock."""

    def __init__(self, path: str, waited_s: float) -> None:
        super().__init__(
            f"Another process is writing to the memory store at {path} (its writer lock {path}/store.lock "
            f"stayed taken for {waited_s:.1f} s). Wait for that read to finish and try again; searching "
            "the store still works meanwhile."
        )


class StoreReadOnlyError(StoreError):
    """A write was attempted on a store opened with readonly=True."""

    def __init__(self, path: str, action: str) -> None:
        super().__init__(f"Cannot {action}: the memory store at {path} was opened with readonly=True. "
                         "Open it with readonly=False to change it.")


class IncompatibleStoreError(StoreError):
    """The store was written for another model or memory configuration."""

    def __init__(self, path: str, differences: Sequence[tuple[str, object, object]]) -> None:
        self.differences = list(differences)
        shown = "; ".join(f"{key}: store has {stored!r}, given {given!r}" for key, stored, given in differences[:8])
        more = f" (and {len(differences) - 8} more)" if len(differences) > 8 else ""
        super().__init__(
            f"The memory store at {path} was written for another model or memory configuration: "
            f"{shown}{more}. Use the same model and memory settings as when it was written, or read the "
            "documents into a new store (another --store path)."
        )


class FingerprintRequiredError(StoreError, ValueError):
    """A document write was started on a store opened without a model fingerprint."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"Cannot write to the memory store at {path} without knowing which model wrote the memory: "
            "open it with fingerprint={...} (model id, config hash, memory config, heads, head_dim, layers)."
        )


class StoreVersionError(StoreError):
    """The store was written by a newer version of this package."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            f"The memory store at {path} has format version {found}, but this version of fot-memory "
            f"reads format {supported} at most. Upgrade the fot-memory-plugin package."
        )


class CorruptDocumentError(StoreError):
    """A document's files are missing, truncated, or differ from their recorded checksums."""

    def __init__(self, doc_id: str, name: str, problem: str) -> None:
        self.doc_id = doc_id
        self.name = name
        self.problem = problem
        super().__init__(
            f"Document {name!r} (id {doc_id}) in the memory store is damaged: {problem}. Other documents "
            f"are unaffected. Forget it (forget {doc_id}) and read the file again."
        )


class DocumentNotFoundError(StoreError, KeyError):
    """No ready document has the given id or name."""

    def __init__(self, key: str, known_names: Iterable[str]) -> None:
        names = list(known_names)
        if names:
            listed = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            hint = f"Known documents: {listed}."
        else:
            hint = "The store holds no documents yet."
        self.key = key
        super().__init__(f"No document with id or name {key!r} in the memory store. {hint}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class InvalidDocumentNameError(StoreError, ValueError):
    """A document name that is empty or looks like a path."""

    def __init__(self, name: object, reason: str) -> None:
        super().__init__(
            f"Invalid document name {name!r}: {reason}. Use a plain label such as the file's base name "
            "(no '/', '\\', NUL or control characters, not '.' or '..', at most 255 characters)."
        )


class DuplicateDocumentError(StoreError):
    """A document with the same name is already stored."""

    def __init__(self, name: str, doc_id: str) -> None:
        super().__init__(
            f"A document named {name!r} is already in the memory store (id {doc_id}). Pass force=True to "
            "replace it, or choose another name."
        )


class StoreDatabaseError(StoreError):
    """memory.sqlite cannot be read: truncated, overwritten, or not a database."""

    def __init__(self, path: str, problem: str) -> None:
        self.problem = problem
        super().__init__(
            f"The memory store's database {path}/memory.sqlite is damaged ({problem}). The documents' "
            f"own files are untouched: run `fot-memory repair --store {path}`, which keeps the damaged "
            "file beside the store and rebuilds the database from the documents' manifests."
        )


class StoreDatabaseMissingError(StoreDatabaseError):
    """docs/ holds document directories but memory.sqlite is gone."""

    def __init__(self, path: str, directories: int) -> None:
        self.problem = f"it is missing or empty while docs/ holds {_directories(directories)}"
        StoreError.__init__(
            self,
            f"The memory store at {path} has lost its database (memory.sqlite is missing or empty) but docs/ still "
            f"holds {_directories(directories)}; nothing was changed. Restore memory.sqlite from a "
            f"backup, or run `fot-memory repair --store {path}` to rebuild it from the documents' manifests."
        )


class StoreDiskFullError(StoreError, OSError):
    """The file system ran out of space (or a file-size limit was hit) while writing."""

    def __init__(self, path: str, needed_bytes: int | None, free_bytes: int | None, detail: str = "") -> None:
        self.needed_bytes, self.free_bytes = needed_bytes, free_bytes
        needed = f"it needs about {_megabytes(needed_bytes)}" if needed_bytes else "it needs more space"
        free = f", {_megabytes(free_bytes)} are free there" if free_bytes is not None else ""
        StoreError.__init__(
            self,
            f"Not enough disk space for the memory store at {path}: {needed}{free}{detail}. No partial "
            "write is left and every stored document is unchanged. Free some space (or choose "
            "another --store on a larger disk) and read the document again."
        )


class StorePathError(StoreError, NotADirectoryError):
    """The store path (or a folder above it) is a file, not a directory."""

    def __init__(self, path: str, blocker: str) -> None:
        where = "is a file" if blocker == path else f"cannot be a directory: {blocker} is a file"
        StoreError.__init__(
            self,
            f"{path} {where}, not a memory store directory. Choose another --store path (a directory, "
            "new or existing)."
        )


class StorePermissionError(StoreError, PermissionError):
    """The store (or one of its files) cannot be read or written by this user."""

    def __init__(self, path: str, action: str, detail: str) -> None:
        StoreError.__init__(
            self,
            f"Permission denied: cannot {action} the memory store at {path} ({detail}). Run as the user who "
            "owns the store, fix its permissions, or use another --store path; nothing stored was changed."
        )


def _megabytes(count: int | None) -> str:
    return f"{(count or 0) / 1e6:,.1f} MB"


def _directories(count: int) -> str:
    return f"{count} document {'directory' if count == 1 else 'directories'}"


class DocumentImportError(StoreError, ValueError):
    """A document cannot be imported from another store (another fingerprint, or a damaged copy)."""
