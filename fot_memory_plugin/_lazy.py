"""Lazy package exports: a package names what it offers, and pays for an import only on first use.

`fot_memory_plugin.persistence` must not import transformers, and `fot-memory --help` must not
import torch, so the package `__init__` files map each exported name to the module defining it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package` that import `names[attr]` (relative) on first access."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            setattr(importlib.import_module(package), name, value)  # the next access is a plain lookup
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(names) | set(vars(importlib.import_module(package))))

    return __getattr__, __dir__
