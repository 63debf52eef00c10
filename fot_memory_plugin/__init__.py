"""FoT (Focused Transformer) retrieval memory for Hugging Face causal language models.

A long document is read once into a key/value memory; the model's memory layers then retrieve
the most relevant keys and values by k-nearest-neighbour search and attend to them together with
the local context (Tworkowski et al., NeurIPS 2023; LongLLaMA).

The package reads by its folders:

- `core/`: the memory configuration, attention math, memory search, the per-layer router, the
  reading and generation engine, the errors a user can hit;
- `models/`: loading the default model or any local checkpoint, FoT-tuned deltas (`deltas/`);
- `documents/`: persistent document memories over a store, and the passages cited as sources;
- `integrations/llama_index/`: the LLM, index, agent memory block and embedding model for
  llama-index (also importable as `llama_index.llms.fot_memory` and `llama_index.memory.fot_memory`);
- `apps/`: the `fot-memory` command and the passkey and perplexity evaluations;
- `training/`: FoT cross-batch training; `distributed/`: reading and serving on Ray;
- `adapters/`, `persistence/`: per model family patching, and the on-disk store.
"""

from __future__ import annotations

from . import _moved
from ._lazy import lazy_exports

__all__ = [
    "MemoryConfig",
    "MemoryEngine",
    "ExactMemory",
    "Memory",
    "Retrieved",
    "load_model",
    "DocumentMemory",
    "FoTMemoryLLM",
    "FoTMemoryIndex",
    "FoTDocumentMemoryBlock",
    "__version__",
]

__version__ = "0.1.0"

# Imported on first use: `import fot_memory_plugin.persistence` must not pay for transformers.
__getattr__, __dir__ = lazy_exports(__name__, {
    "MemoryConfig": ".core.config",
    "MemoryEngine": ".core.engine",
    "ExactMemory": ".core.memory",
    "Memory": ".core.memory",
    "Retrieved": ".core.memory",
    "load_model": ".models.loading",
    "DocumentMemory": ".documents.document_memory",
    "FoTMemoryLLM": ".integrations.llama_index.llm",
    "FoTMemoryIndex": ".integrations.llama_index.index",
    "FoTDocumentMemoryBlock": ".integrations.llama_index.agent_memory",
})

_moved.install(__name__)
