"""The memory configuration: one frozen dataclass, names following LongLLaMA where one exists."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MemoryConfig", "PositionalMode", "Retrieval", "MEM_DTYPES", "AnswerMode", "Ranking", "ANSWER_MODES",
           "RANKINGS", "DEFAULT_ANSWER_MODE", "CHAT_ANSWER_INSTRUCTIONS", "DEFAULT_RANKING", "INDEX_KINDS",
           "DEFAULT_INDEX", "RETRIEVALS"]

PositionalMode = Literal["zero", "fixed"]
Retrieval = Literal["exact", "hnsw", "blocks"]
RETRIEVALS: tuple[str, ...] = ("exact", "hnsw", "blocks")
# "int8" is a store format (kvfile: per-vector scales, half of float16's bytes): the in-RAM
# memory of such a config holds float16 (MemoryConfig.ram_dtype).
MEM_DTYPES = ("float32", "float16", "bfloat16", "int8")

# How a question is answered from stored documents, and how its sources are ranked (passages.py).
AnswerMode = Literal["memory", "reread", "passages"]
Ranking = Literal["lift", "attention"]
ANSWER_MODES: tuple[str, ...] = ("memory", "reread", "passages")
RANKINGS: tuple[str, ...] = ("lift", "attention")
# Decided on long-document QA (benchmarks/long_doc_qa.py, 70 questions over three held-out books,
# smollm2-fot read without retrieval, H200): "passages" (the cited passages' text, each with a
# neighbour either side, answered from by the base weights with memory detached) answers 28, 28
# and 25 of 70 at ~4k, ~16k and ~64k tokens, against 19, 11 and 3 for memory alone, 22, 21 and 16
# for reread and 26, 26 and 25 for RAG. Lift keeps the document's opening and other attention
# sinks out of the sources (planted facts, benchmarks/README.md). Since then the best passage is
# placed last, next to the question (passages.passage_text): 35, 36 and 32 of 70 on the CPU.
DEFAULT_ANSWER_MODE: AnswerMode = "passages"
# Appended to a question asked in the chat template, per answer mode. Measured on the same
# benchmark (question form, CPU): "passages" answers 11, 11 and 9 of 35 with it at ~4k, ~16k and
# ~64k against 8, 6 and 7 without; "memory" (4 -> 4 at ~4k) and "reread" (4 -> 5) barely move, so
# they ask the question as written.
CHAT_ANSWER_INSTRUCTIONS: dict[str, str] = {"passages": " Answer in a few words."}
# How a store indexes a document's keys (persistence/: cluster_index.py, hnsw_index.py). Clusters
# by default: on a whole novel's asked queries the same recall@32 as hnswlib at its default ef
# (0.967), stores 2.5x smaller (3.9 KB per token for 5 layers, against 9.9), opened and first
# answered 1.7-3.2x faster at 100k tokens, and no inserts to limit a GPU read (benchmarks/README.md).
INDEX_KINDS: tuple[str, ...] = ("clusters", "hnsw")
DEFAULT_INDEX = "clusters"
DEFAULT_RANKING: Ranking = "lift"


@dataclass(frozen=True)
class MemoryConfig:
    """How a model reads into and retrieves from FoT memory.

    The defaults are the ones measured best for SmolLM2-135M used zero-shot
    (benchmarks/README.md, passkey table).
    """

    # Layers whose attention also reads memory. None means every layer: a model that
    # was not FoT-trained needs memory in (nearly) all of them (DESIGN.md, measured).
    mem_layers: tuple[int, ...] | None = None
    # Tokens per reading window; each window attends to itself plus retrieved memory.
    local_window: int = 512
    # Tokens of a prompt kept in the local context; anything before them goes to memory
    # first (LongLLaMA's name). None means local_window.
    last_context_length: int | None = None
    # Memory keys retrieved per query head and query position. 32 beat 128 for SmolLM2
    # zero-shot (passkey 3/3 at 64k tokens vs 1/3; benchmarks/README.md) and costs less.
    top_k: int = 32
    # "zero": query at its local position, memory keys at position 0 (LongLLaMA, what
    # FoT-trained checkpoints expect). "fixed": every query rotated to one constant
    # position (InfLLM), so all memory looks `fixed_position` tokens away. Tied on the
    # passkey at k=32 up to 64k tokens; "zero" is the default because training uses it.
    positional_mode: PositionalMode = "zero"
    # Position used by "fixed" mode. None means local_window: memory sits one window back.
    fixed_position: int | None = None
    # "exact": matmul + top-k over every key, in RAM and in stores (the reference). "hnsw":
    # stores are searched through their indexes (cluster indexes or hnswlib graphs, whichever a
    # document has), reading in RAM stays exact. "blocks": reading in RAM uses block retrieval
    # too (core/blocks.py: linear in the document), stores their indexes.
    retrieval: Retrieval = "exact"
    # dtype of the memory: the in-RAM tensors' (but int8: float16 there) and a store's files
    # (a store keeps float16 unless told).
    mem_dtype: str = "float32"
    # Queries attend to memory in chunks of this many positions, bounding the size of the
    # retrieved (B, H, chunk, top_k, D) tensors. None processes a whole window at once.
    mem_attention_grouping: int | None = 128

    def __post_init__(self) -> None:
        if self.mem_layers is not None:
            layers = tuple(int(layer) for layer in self.mem_layers)
            if not layers:
                raise ValueError("mem_layers is empty: give at least one layer index, or None for all layers.")
            if any(layer < 0 for layer in layers):
                raise ValueError(f"mem_layers {layers} has a negative index: use 0-based layer indices.")
            if len(set(layers)) != len(layers):
                raise ValueError(f"mem_layers {layers} repeats a layer: list each layer once.")
            object.__setattr__(self, "mem_layers", tuple(sorted(layers)))
        _require_positive("local_window", self.local_window)
        _require_positive("top_k", self.top_k)
        if self.last_context_length is not None:
            _require_positive("last_context_length", self.last_context_length)
        if self.fixed_position is not None and self.fixed_position < 0:
            raise ValueError(f"fixed_position must be >= 0, got {self.fixed_position}.")
        if self.mem_attention_grouping is not None:
            _require_positive("mem_attention_grouping", self.mem_attention_grouping)
        if self.positional_mode not in ("zero", "fixed"):
            raise ValueError(f"positional_mode must be 'zero' or 'fixed', got {self.positional_mode!r}.")
        if self.retrieval not in RETRIEVALS:
            raise ValueError(f"retrieval must be one of {RETRIEVALS}, got {self.retrieval!r}.")
        if self.mem_dtype not in MEM_DTYPES:
            raise ValueError(f"mem_dtype must be one of {MEM_DTYPES}, got {self.mem_dtype!r}.")

    @property
    def context_length(self) -> int:
        """Prompt tokens kept in the local context (last_context_length, else local_window)."""
        return self.last_context_length or self.local_window

    @property
    def query_position(self) -> int:
        """The position every query takes against memory in "fixed" mode."""
        return self.local_window if self.fixed_position is None else self.fixed_position

    @property
    def ram_dtype(self) -> str:
        """The torch dtype name of the in-RAM memory tensors (an int8 store's are float16)."""
        return "float16" if self.mem_dtype == "int8" else self.mem_dtype

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The memory layers of a model with `num_layers` layers, checked against it."""
        if self.mem_layers is None:
            return tuple(range(num_layers))
        too_deep = [layer for layer in self.mem_layers if layer >= num_layers]
        if too_deep:
            raise ValueError(
                f"mem_layers {too_deep} do not exist: the model has {num_layers} layers (0..{num_layers - 1})."
            )
        return self.mem_layers

    def replace(self, **changes: Any) -> MemoryConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["mem_layers"] is not None:
            data["mem_layers"] = list(data["mem_layers"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MemoryConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown memory config fields {sorted(unknown)}; known fields are {sorted(known)}.")
        data = dict(data)
        if data.get("mem_layers") is not None:
            data["mem_layers"] = tuple(data["mem_layers"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _require_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
