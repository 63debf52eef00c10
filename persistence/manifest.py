"""A document directory's manifest: everything its SQLite rows hold, kept beside its files.

`docs/<doc_id>/manifest.json` is written (and fsynced) before the directory is published, so a
document directory describes itself: if memory.sqlite is lost or damaged, `repair` rebuilds the
rows from the manifests instead of losing the documents. The manifest carries a CRC-32 of its
own body, so a damaged one is told apart from a sound one.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import MANIFEST_NAME, StoreLayout, fsync_dir, fsync_file
from .metadata import DocumentRecord

__all__ = ["Manifest", "write_manifest", "read_manifest", "ManifestError"]

_VERSION = 1


class ManifestError(ValueError):
    """A manifest that is missing, unreadable, or differs from its checksum (internal: repair
    reports it per directory)."""


@dataclass(frozen=True)
class Manifest:
    record: DocumentRecord
    chunks: list[tuple[int, int, int, int, str]]  # (start_token, end_token, start_char, end_char, text)
    fingerprint: dict[str, Any]
    format_version: int


def _body_crc(body: dict[str, Any]) -> str:
    return f"{zlib.crc32(json.dumps(body, sort_keys=True).encode('utf-8')):08x}"


def write_manifest(layout: StoreLayout, directory: Path, manifest: Manifest) -> None:
    """Write `directory/manifest.json` atomically (temporary file, fsync, rename, fsync the directory)."""
    body = {
        "manifest_version": _VERSION,
        "format_version": manifest.format_version,
        "fingerprint": manifest.fingerprint,
        "record": manifest.record.to_row(),
        "chunks": [list(chunk) for chunk in manifest.chunks],
    }
    temporary = directory / (MANIFEST_NAME + ".tmp")
    temporary.write_text(json.dumps({"crc32": _body_crc(body), "body": body}, sort_keys=True), encoding="utf-8")
    layout.restrict(temporary)
    fsync_file(temporary)
    os.replace(temporary, directory / MANIFEST_NAME)
    fsync_dir(directory)


def read_manifest(directory: Path) -> Manifest:
    """The manifest of a document directory; ManifestError saying what is wrong with it."""
    path = directory / MANIFEST_NAME
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        body = stored["body"]
        if stored["crc32"] != _body_crc(body):
            raise ManifestError(f"{path.name} differs from its checksum")
        record = DocumentRecord.from_row(body["record"])
        chunks = [tuple(chunk) for chunk in body["chunks"]]
        return Manifest(record, chunks, body["fingerprint"], int(body["format_version"]))  # type: ignore[arg-type]
    except FileNotFoundError:
        raise ManifestError(f"it has no {MANIFEST_NAME} (written by fot-memory before 0.2, or not a document)") from None
    except ManifestError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ManifestError(f"{path.name} cannot be read ({type(error).__name__}: {error})") from None
