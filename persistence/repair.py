"""Repair a store from its documents' own manifests, deleting nothing.

`repair_store` is what to run when memory.sqlite is missing or damaged, or when docs/ holds
directories the database does not know (a database restored from an older backup, say):

- a damaged memory.sqlite (and its -wal / -shm) is renamed `memory.sqlite.damaged-<time>`, kept;
- a new or sound database gets a row for every document directory whose manifest is sound, whose
  files match the manifest's sizes and checksums, and whose model fingerprint is the store's;
- any other directory under docs/ is moved to lost+found/ with the reason in the report.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import filelock

from .errors import StoreDatabaseError, StoreLockedError
from .faults import check_store_path, translated
from .files import StoreLayout, crc32_file, fsync_dir
from .manifest import Manifest, ManifestError, read_manifest
from .metadata import FORMAT_VERSION, Metadata, fingerprint_differences, normalise_fingerprint

__all__ = ["RepairReport", "repair_store"]

logger = logging.getLogger(__name__)


@dataclass
class RepairReport:
    """What `repair_store` found and did."""

    path: str
    database: str  # "sound", "created (it was missing)" or "rebuilt (damaged file kept as ...)"
    restored: list[str] = field(default_factory=list)  # names of documents given their rows back
    moved_to_lost_found: dict[str, str] = field(default_factory=dict)  # directory -> reason
    missing_files: list[str] = field(default_factory=list)  # names whose rows point at no directory

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "database": self.database, "restored": self.restored,
                "moved_to_lost_found": self.moved_to_lost_found, "missing_files": self.missing_files}


def repair_store(path: str | os.PathLike[str], *, lock_timeout: float = 1.0) -> RepairReport:
    """Repair the store at `path` (see the module docstring); holds the writer lock throughout."""
    root = Path(path).expanduser().absolute()
    check_store_path(root)
    if not root.is_dir() or not ((root / "docs").is_dir() or (root / "memory.sqlite").exists()):
        raise StoreDatabaseError(str(root), "there is no store here to repair (no docs/ and no memory.sqlite)")
    layout = StoreLayout(root, private=not root.stat().st_mode & 0o077)
    with translated(root, "repair"):
        lock = filelock.FileLock(str(layout.lock), thread_local=False)
        try:
            lock.acquire(timeout=lock_timeout)
        except filelock.Timeout:
            raise StoreLockedError(str(root), lock_timeout) from None
        try:
            return _repair_locked(layout)
        finally:
            lock.release()


def _repair_locked(layout: StoreLayout) -> RepairReport:
    layout.make_dirs()
    meta, database = _sound_database(layout)
    report = RepairReport(str(layout.root), database)
    try:
        meta.ensure_schema()
        recorded = meta.get_meta("fingerprint")
        fingerprint = None if recorded is None else normalise_fingerprint(json.loads(recorded))
        known = meta.known_ids()
        pending = meta.pending()
        candidates = _read_candidates(layout, known | set(pending), report)
        if fingerprint is None and candidates:  # the newest document's model is the store's
            fingerprint = normalise_fingerprint(max(candidates, key=lambda m: m.record.created).fingerprint)
            meta.record_fingerprint(fingerprint)
        taken = {record.name for record in meta.documents()}
        for manifest in sorted(candidates, key=lambda m: m.record.created, reverse=True):
            _adopt(layout, meta, manifest, fingerprint, taken, report)
        report.missing_files = [record.name for record in meta.documents()
                                if not layout.doc_dir(record.id).is_dir()]
    finally:
        meta.close()
    logger.info("repaired %s: %s", layout.root, report.to_dict())
    return report


def _sound_database(layout: StoreLayout) -> tuple[Metadata, str]:
    """The store's database if it is sound; else a new one, the damaged file kept beside it."""
    if not layout.sqlite.exists():
        return Metadata(layout.sqlite, readonly=False, private=layout.private), "created (it was missing)"
    try:
        meta = Metadata(layout.sqlite, readonly=False, private=layout.private)
    except StoreDatabaseError as error:
        problem = error.problem
    else:
        problem = meta.integrity_problem() if _readable(meta) else "its tables cannot be read"
        if problem is None:
            return meta, "sound" if meta.format_version() is not None else "created (it was empty)"
        meta.close()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    kept = layout.root / f"memory.sqlite.damaged-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        source = layout.root / f"memory.sqlite{suffix}"
        if source.exists():
            os.rename(source, layout.root / f"{kept.name}{suffix}")
    fsync_dir(layout.root)
    logger.warning("memory.sqlite was damaged (%s); kept as %s", problem, kept.name)
    meta = Metadata(layout.sqlite, readonly=False, private=layout.private)
    return meta, f"rebuilt (the damaged file is kept as {kept.name}: {problem})"


def _readable(meta: Metadata) -> bool:
    try:
        meta.format_version()
        meta.known_ids()
        return True
    except StoreDatabaseError:
        return False


def _read_candidates(layout: StoreLayout, accounted: set[str], report: RepairReport) -> list[Manifest]:
    """Manifests of the directories the database does not account for, their files checked;
    directories that fail are moved to lost+found/."""
    candidates = []
    for directory in sorted(layout.docs.iterdir()):
        if directory.name in accounted:
            continue
        try:
            manifest = read_manifest(directory)
            if manifest.record.id != directory.name:
                raise ManifestError(f"its manifest describes document {manifest.record.id}")
            _check_files(directory, manifest)
        except ManifestError as error:
            _move_to_lost_found(layout, directory, str(error), report)
            continue
        candidates.append(manifest)
    return candidates


def _check_files(directory: Path, manifest: Manifest) -> None:
    for name, expected in manifest.record.files.items():
        path = directory / name
        if not path.is_file():
            raise ManifestError(f"{name} is missing")
        if path.stat().st_size != expected["size"] or crc32_file(path) != expected["crc32"]:
            raise ManifestError(f"{name} differs from the size or checksum in its manifest")


def _adopt(layout: StoreLayout, meta: Metadata, manifest: Manifest, fingerprint: dict[str, Any] | None,
           taken: set[str], report: RepairReport) -> None:
    """Give a checked directory its rows back, unless its model or name conflicts."""
    record, directory = manifest.record, layout.doc_dir(manifest.record.id)
    differences = fingerprint_differences(fingerprint, normalise_fingerprint(manifest.fingerprint))
    if differences:
        fields = ", ".join(key for key, _, _ in differences[:4])
        _move_to_lost_found(layout, directory, f"written with another model or memory config ({fields})", report)
    elif record.name in taken:
        _move_to_lost_found(layout, directory, f"another document named {record.name!r} is stored (this is "
                            "an older version, or one a forget did not finish removing)", report)
    elif manifest.format_version > FORMAT_VERSION:
        _move_to_lost_found(layout, directory, f"written in format {manifest.format_version}, newer than "
                            f"this fot-memory reads ({FORMAT_VERSION})", report)
    else:
        meta.insert_document(record, manifest.chunks)
        taken.add(record.name)
        report.restored.append(record.name)


def _move_to_lost_found(layout: StoreLayout, directory: Path, reason: str, report: RepairReport) -> None:
    layout.lost_found.mkdir(exist_ok=True)
    layout.restrict(layout.lost_found)
    target = layout.lost_found / directory.name
    number = 1
    while target.exists():
        target = layout.lost_found / f"{directory.name}.{number}"
        number += 1
    os.rename(directory, target)
    (layout.lost_found / f"{target.name}.reason.txt").write_text(reason + "\n", encoding="utf-8")
    fsync_dir(layout.lost_found)
    fsync_dir(layout.docs)
    logger.warning("moved %s to %s: %s", directory, target, reason)
    report.moved_to_lost_found[str(target.relative_to(layout.root))] = reason
