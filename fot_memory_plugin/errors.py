"""Every exception this package raises on purpose, importable from one place.

Adapters and persistence never import the core, so their exceptions are defined beside them and
re-exported here.
"""

from __future__ import annotations

from .adapters.base import AdapterStateError, UnsupportedModelError

__all__ = [
    "FoTMemoryError",
    "UnsupportedModelError",
    "AdapterStateError",
    "ModelNotFoundError",
]


class FoTMemoryError(Exception):
    """Base class of the core's own errors."""


class ModelNotFoundError(FoTMemoryError, FileNotFoundError):
    """A model name or path that resolves to nothing on this machine."""
