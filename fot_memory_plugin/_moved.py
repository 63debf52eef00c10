"""The flat module paths of fot-memory 0.1 (`fot_memory_plugin.engine`, `.index`, `.models`, ...),
kept importable after the package was split into folders.

`import fot_memory_plugin.engine` returns the very module `fot_memory_plugin.core.engine` (so
patching either name patches both) and warns once with the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

# old name under fot_memory_plugin -> new name under fot_memory_plugin
MOVED = {
    "config": "core.config",
    "attention": "core.attention",
    "memory": "core.memory",
    "router": "core.router",
    "engine": "core.engine",
    "errors": "core.errors",
    "delta": "models.delta",
    "passages": "documents.passages",
    "llm": "integrations.llama_index.llm",
    "index": "integrations.llama_index.index",
    "agent_memory": "integrations.llama_index.agent_memory",
    "embeddings": "integrations.llama_index.embeddings",
    "cli": "apps.cli",
    "passkey": "apps.passkey",
    "perplexity": "apps.perplexity",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, package: str) -> None:
        self._targets = {f"{package}.{old}": f"{package}.{new}" for old, new in MOVED.items()}

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        if fullname not in self._targets:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=False)

    def create_module(self, spec) -> ModuleType:  # noqa: ANN001
        new = self._targets[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there.", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__  # importlib overwrites __spec__ next; exec_module restores it
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state


def install(package: str) -> None:
    """Make `package.<old name>` import its new module (once per process)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder(package))
