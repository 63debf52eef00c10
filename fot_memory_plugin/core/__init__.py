"""The FoT method itself: configuration, attention math, memory search, routing, the engine.

- `config.py`: `MemoryConfig`, the one frozen configuration;
- `attention.py`: the joint local + memory softmax, and its plain reference;
- `memory.py`: the `Memory` contract and the exact in-RAM memory;
- `router.py`: per memory-layer call: capture, retrieve, attend;
- `engine.py`: reading in windows, generation, streaming;
- `errors.py`: one exception class per failure a user can hit.
"""

from __future__ import annotations

from .._lazy import lazy_exports

__all__ = ["MemoryConfig", "MemoryEngine", "Memory", "ExactMemory", "Retrieved", "MemoryRouter", "FoTMemoryError"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "MemoryConfig": ".config",
    "MemoryEngine": ".engine",
    "Memory": ".memory",
    "ExactMemory": ".memory",
    "Retrieved": ".memory",
    "MemoryRouter": ".router",
    "FoTMemoryError": ".errors",
})
