"""llama-index's conventional import path for FoT document memory in agents:
`from llama_index.memory.fot_memory import FoTDocumentMemoryBlock`.

Installed as the `llama_index.memory.fot_memory` package; `llama_index/` and
`llama_index/memory/` stay PEP 420 namespace packages (no `__init__.py`).
"""

from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock, document_memory_tool
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex

__all__ = ["FoTDocumentMemoryBlock", "document_memory_tool", "FoTMemoryIndex"]
