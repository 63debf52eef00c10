"""Persistent document memories: read once into a store, ask from any process, cite passages.

- `document_memory.py`: `DocumentMemory` joins the engine and the store (reading, asking, sources);
- `passages.py`: sentence-aligned passages, memory attention per passage, ranking by lift or
  weight, re-read answering's prompt;
- `voting_heads.py`: the calibrated memory heads whose attention ranks passages (`heads/*.json`);
- `long_prompts.py`: questions and prompts longer than the local context, their head read into memory;
- `conversations.py`: chat turns appended to a store as conversation parts, each append reading
  only the new turns.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_DOCUMENT_MEMORY = ["DocumentMemory", "Answer", "Source", "LeftOut", "default_store_dir", "load_text", "STORE_ENV",
                    "STORE_DEFAULTS"]
__all__ = [*_DOCUMENT_MEMORY, "ask_any_length"]

__getattr__, __dir__ = lazy_exports(__name__, {**{name: ".document_memory" for name in _DOCUMENT_MEMORY},
                                               "ask_any_length": ".long_prompts"})
