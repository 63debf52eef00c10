"""FoT (Focused Transformer) retrieval memory for Hugging Face causal language models.

A long document is read once into a key/value memory; the model's memory layers then retrieve
the most relevant keys and values by k-nearest-neighbour search and attend to them together with
the local context (Tworkowski et al., NeurIPS 2023; LongLLaMA).
"""

from __future__ import annotations

from .config import MemoryConfig
from .engine import MemoryEngine
from .memory import ExactMemory, Memory, Retrieved

__all__ = ["MemoryConfig", "MemoryEngine", "ExactMemory", "Memory", "Retrieved", "__version__"]

__version__ = "0.1.0"
