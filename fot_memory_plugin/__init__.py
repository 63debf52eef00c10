"""FoT (Focused Transformer) retrieval memory for Hugging Face causal language models.

A long document is read once into a key/value memory; the model's memory layers then retrieve
the most relevant keys and values by k-nearest-neighbour search and attend to them together with
the local context (Tworkowski et al., NeurIPS 2023; LongLLaMA).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["MemoryConfig", "MemoryEngine", "ExactMemory", "Memory", "Retrieved", "load_model", "__version__"]

__version__ = "0.1.0"

# Imported on first use: `import fot_memory_plugin.persistence` must not pay for transformers.
_LAZY = {
    "MemoryConfig": ".config",
    "MemoryEngine": ".engine",
    "ExactMemory": ".memory",
    "Memory": ".memory",
    "Retrieved": ".memory",
    "load_model": ".models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
