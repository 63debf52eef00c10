"""The operating system's and SQLite's failures, as the store's named errors.

A store operation that hits a full disk, a permission it lacks, a path that is a file, or a
damaged database raises one of the errors in errors.py, whose message says what to do, never a
raw `OSError` or `sqlite3.DatabaseError` (the original stays attached as `__cause__`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from .errors import (
    StoreDatabaseError,
    StoreDiskFullError,
    StoreError,
    StoreLockedError,
    StorePathError,
    StorePermissionError,
)

__all__ = ["translated", "as_store_error", "free_bytes", "check_store_path", "DISK_FULL_ERRNOS"]

# No space left, quota exceeded, file-size limit (RLIMIT_FSIZE): all mean "this will not fit".
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_PERMISSION_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def free_bytes(path: Path) -> int | None:
    """Bytes free to this process on the file system holding `path` (or its nearest parent)."""
    for candidate in (path, *path.parents):
        try:
            usage = os.statvfs(candidate)
        except OSError:
            continue
        blocks = usage.f_bfree if os.geteuid() == 0 else usage.f_bavail  # root may use reserved blocks
        return blocks * usage.f_frsize
    return None


def as_store_error(error: BaseException, root: Path, action: str,
                   needed_bytes: int | None = None) -> StoreError | None:
    """The named store error for `error`, or None when it is not a store fault we know."""
    if isinstance(error, StoreError):
        return None
    if isinstance(error, OSError):
        if error.errno in DISK_FULL_ERRNOS:
            detail = " (a file-size limit was reached)" if error.errno == errno.EFBIG else ""
            return StoreDiskFullError(str(root), needed_bytes, free_bytes(root), detail)
        if error.errno in _PERMISSION_ERRNOS:
            where = f"{error.strerror}: {error.filename}" if error.filename else str(error.strerror)
            return StorePermissionError(str(root), action, where)
        if error.errno == errno.ENOTDIR or isinstance(error, FileExistsError):
            return _path_error(root)
        return None
    if isinstance(error, sqlite3.DatabaseError):
        message = str(error).lower()
        if "disk is full" in message:
            return StoreDiskFullError(str(root), needed_bytes, free_bytes(root))
        if "readonly" in message or "read-only" in message or "unable to open" in message:
            return StorePermissionError(str(root), action, f"SQLite: {error}")
        if "locked" in message or "busy" in message:
            return StoreLockedError(str(root), 30.0)
        return StoreDatabaseError(str(root), str(error))
    return None


@contextlib.contextmanager
def translated(root: Path, action: str, needed_bytes: int | None = None) -> Iterator[None]:
    """Raise the named store error instead of the OS's or SQLite's."""
    try:
        yield
    except (OSError, sqlite3.DatabaseError) as error:
        converted = as_store_error(error, root, action, needed_bytes)
        if converted is None:
            raise
        raise converted from error


def check_store_path(root: Path) -> None:
    """StorePathError if `root` or a folder above it is a file (before anything is created)."""
    if root.exists() and not root.is_dir():
        raise StorePathError(str(root), str(root))
    for parent in root.parents:
        if parent.exists():
            if not parent.is_dir():
                raise StorePathError(str(root), str(parent))
            return


def _path_error(root: Path) -> StoreError:
    try:
        check_store_path(root)
    except StorePathError as error:
        return error
    return StorePathError(str(root), str(root))

