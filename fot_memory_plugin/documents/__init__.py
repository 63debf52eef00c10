"""Persistent document memories: read once into a store, ask from any process, cite passages.

- `document_memory.py`: `DocumentMemory` joins the engine and the store (reading, asking, sources);
- `passages.py`: sentence-aligned passages, memory attention per passage, ranking by lift or
  weight, re-read answering's prompt;
- `voting_heads.py`: the calibrated memory heads whose attention ranks passages (`heads/*.json`).
- `conversations.py`: chat turns appended to a store as conversation parts, each append reading
  only the new turns.
"""

from __future__ import annotations

from .._lazy import lazy_exports

__all__ = ["DocumentMemory", "Answer", "Source", "LeftOut", "default_store_dir", "load_text", "STORE_ENV",
           "STORE_DEFAULTS"]

__getattr__, __dir__ = lazy_exports(__name__, {name: ".document_memory" for name in __all__})
