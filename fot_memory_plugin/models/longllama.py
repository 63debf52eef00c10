"""LongLLaMA / FoT checkpoints on the Llama adapter, without their remote code.

A LongLLaMA checkpoint (CStanKonrad/long_llama; `config.json` with `"model_type": "longllama"`)
stores Llama's weights under Llama's parameter names: its authors load it as a plain
`LlamaForCausalLM` too ("drop-in use"). What makes it a FoT model is its config:

| LongLLaMA key               | what it means there                                   | here                        |
|-----------------------------|-------------------------------------------------------|-----------------------------|
| `mem_layers`                | the layers with memory attention                      | `MemoryConfig.mem_layers`   |
| `max_position_embeddings`   | the window long inputs are read in (2048 for 3B)      | `local_window`              |
| `last_context_length`       | prompt tokens kept in the local context (1024)        | `last_context_length`       |
| `mem_positionals` = true    | memory keys rotated "as if first" (position 0), the   | `positional_mode="zero"`    |
|                             | query at its position relative to the local window    |                             |
| `mem_positionals` = false   | no rotary encoding at all in the memory layers        | refused (not implementable  |
|                             |                                                       | on the Llama attention)     |
| `mem_dtype`                 | dtype of the memory cache                             | `mem_dtype`                 |
| `mem_attention_grouping`    | (heads, queries) processed at once                    | `mem_attention_grouping` =  |
|                             |                                                       | the queries                 |
| `rope_theta`                | rotary base                                           | the Llama config's          |
| `torch_attention`, `gradient_checkpoint_every_ith`, `auto_map` | how its own code runs  | ignored: never run    |

LongLLaMA's released inference attends to ALL of memory; ours retrieves `top_k` keys per query
(the k = all case is `top_k` >= the memory's size).

    >>> loaded = load_model("/models/long_llama_3b_v1_1")          # doctest: +SKIP
    >>> loaded.memory_config.mem_layers, loaded.memory_config.local_window
    ((6, 12, 18), 2048)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedTokenizerBase

from ..core.config import MEM_DTYPES, MemoryConfig
from ..core.errors import MissingDependencyError, ModelNotFoundError, UnsupportedCheckpointError

__all__ = ["LONGLLAMA_MODEL_TYPE", "is_longllama_checkpoint", "llama_config_from_longllama",
           "checkpoint_memory_config", "load_longllama"]

logger = logging.getLogger(__name__)

LONGLLAMA_MODEL_TYPE = "longllama"
# Keys that only LongLLaMA's own code reads, or that name that code: never passed on.
_IGNORED_KEYS = ("model_type", "auto_map", "architectures", "torch_attention", "gradient_checkpoint_every_ith")
# The FoT keys: kept on the Llama config (they describe the checkpoint, and travel into store
# fingerprints with it), and read by checkpoint_memory_config.
_MEMORY_KEYS = ("mem_layers", "last_context_length", "mem_positionals", "mem_dtype", "mem_attention_grouping")


def is_longllama_checkpoint(path: Path) -> bool:
    """Whether the directory's config.json says model_type "longllama"."""
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == LONGLLAMA_MODEL_TYPE


def llama_config_from_longllama(data: dict[str, Any], where: str = "this checkpoint") -> LlamaConfig:
    """The LlamaConfig of a LongLLaMA config.json (a dict), its FoT keys kept as attributes."""
    if data.get("rope_scaling") is not None:
        raise UnsupportedCheckpointError(
            f"{where} sets rope_scaling {data['rope_scaling']!r}, which LongLLaMA itself refuses: remove the key "
            "or use a checkpoint without it."
        )
    if data.get("mem_positionals", True) is False:
        raise UnsupportedCheckpointError(
            f"{where} sets mem_positionals false: its memory layers use no rotary encoding at all, which the "
            "Llama attention cannot compute. Only mem_positionals true (memory keys at position 0) is supported."
        )
    fields = {key: value for key, value in data.items() if key not in _IGNORED_KEYS + ("rope_scaling",)}
    fields.setdefault("mem_layers", [])
    fields.setdefault("last_context_length", 1024)  # LongLLaMA's default
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    return config


def checkpoint_memory_config(config: PreTrainedConfig) -> MemoryConfig | None:
    """The memory config a checkpoint was FoT-trained for, from LongLLaMA's keys on its config;
    None when it names no memory layers (a model used zero-shot)."""
    layers = getattr(config, "mem_layers", None)
    if not layers:
        return None
    grouping = getattr(config, "mem_attention_grouping", None)
    if isinstance(grouping, (list, tuple)):  # LongLLaMA: (heads, queries) at once; we chunk queries only
        grouping = int(grouping[-1])
    mem_dtype = getattr(config, "mem_dtype", None)
    memory = MemoryConfig(
        mem_layers=tuple(int(layer) for layer in layers),
        local_window=int(config.max_position_embeddings),
        last_context_length=getattr(config, "last_context_length", None),
        positional_mode="zero",
        mem_dtype=mem_dtype if mem_dtype in MEM_DTYPES else MemoryConfig.mem_dtype,
        mem_attention_grouping=grouping if grouping is not None else MemoryConfig.mem_attention_grouping,
    )
    memory.layers_for(int(config.num_hidden_layers))  # a layer the model lacks is refused here
    return memory


def load_longllama(path: Path, torch_dtype: torch.dtype) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A LongLLaMA checkpoint directory as a LlamaForCausalLM and its tokenizer (no remote code)."""
    data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config = llama_config_from_longllama(data, where=str(path))
    checkpoint_memory_config(config)  # refuse bad memory keys before reading gigabytes of weights
    _require_tokenizer_reader(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, config=config, local_files_only=True)
        model, info = LlamaForCausalLM.from_pretrained(path, config=config, local_files_only=True, dtype=torch_dtype,
                                                       output_loading_info=True)
    except OSError as error:
        raise ModelNotFoundError(
            f"{path} is incomplete ({error}): a LongLLaMA checkpoint needs config.json, its weights and its "
            "tokenizer files."
        ) from error
    missing = [name for name in info["missing_keys"] if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing:
        raise UnsupportedCheckpointError(
            f"{path} lacks the weights {sorted(missing)[:4]}{' ...' if len(missing) > 4 else ''}: it is not a "
            "LongLLaMA checkpoint in Llama's parameter names (model.layers.N.self_attn.q_proj.weight, ...)."
        )
    unexpected = [name for name in info["unexpected_keys"] if not name.endswith("rotary_emb.inv_freq")]
    if unexpected:
        logger.warning("%s has weights the Llama model does not use: %s", path, sorted(unexpected)[:4])
    logger.info("loaded LongLLaMA checkpoint %s as LlamaForCausalLM (memory layers %s)", path, config.mem_layers)
    return model, tokenizer


def _require_tokenizer_reader(path: Path) -> None:
    """LongLLaMA ships its (OpenLLaMA) tokenizer as a SentencePiece model only: transformers reads
    that with the sentencepiece package, and otherwise fails with an unrelated parse error."""
    if (path / "tokenizer.json").is_file() or not (path / "tokenizer.model").is_file():
        return
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            f"{path} has its tokenizer only as a SentencePiece model (tokenizer.model), which transformers reads "
            "with the sentencepiece package: run `pip install sentencepiece`, then load it again."
        ) from None
