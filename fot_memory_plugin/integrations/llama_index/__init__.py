"""fot-memory for llama-index-core 0.14: an LLM, an index, an agent memory block, an embedding model.

- `llm.py`: `FoTMemoryLLM`, answering from document memory;
- `index.py`: `FoTMemoryIndex`, its retriever and query engine;
- `agent_memory.py`: `FoTDocumentMemoryBlock` for agents' `Memory`, and the query-engine tool;
- `embeddings.py`: `MiniLMEmbedding`, the local embedding model of the RAG baseline;
- `function_calling.py`: why `FoTMemoryLLM` refuses FunctionAgent and tool-calling methods.

The conventional paths `llama_index.llms.fot_memory` and `llama_index.memory.fot_memory` import
from here.
"""

from __future__ import annotations

from ..._lazy import lazy_exports

__all__ = ["FoTMemoryLLM", "FoTMemoryIndex", "FoTMemoryRetriever", "FoTMemoryQueryEngine", "FoTDocumentMemoryBlock",
           "document_memory_tool", "MiniLMEmbedding"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "FoTMemoryLLM": ".llm",
    "FoTMemoryIndex": ".index",
    "FoTMemoryRetriever": ".index",
    "FoTMemoryQueryEngine": ".index",
    "FoTDocumentMemoryBlock": ".agent_memory",
    "document_memory_tool": ".agent_memory",
    "MiniLMEmbedding": ".embeddings",
})
