"""llama-index's conventional import path for the FoT memory LLM: `from llama_index.llms.fot_memory import FoTMemoryLLM`.

This directory is installed as the `llama_index.llms.fot_memory` package (pyproject's
package-dir); `llama_index/` and `llama_index/llms/` stay PEP 420 namespace packages with no
`__init__.py`, so llama-index-core and every other `llama_index.*` package keep working.
"""

from fot_memory_plugin.integrations.llama_index.agent_memory import FoTDocumentMemoryBlock, document_memory_tool
from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex
from fot_memory_plugin.integrations.llama_index.llm import FoTMemoryLLM

# Every class [tool.llamahub] lists is importable from this one path (the memory block is also at
# llama_index.memory.fot_memory).
__all__ = ["FoTMemoryLLM", "FoTMemoryIndex", "FoTDocumentMemoryBlock", "document_memory_tool"]
