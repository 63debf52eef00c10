"""FoT-tuned deltas: what a cross-batch training run changed, small enough to ship in the repository.

A delta directory holds
    delta.safetensors   trained minus base, float16, for the trained parameters only
    fot_config.json     the memory config the model was trained for (mem_layers, positional mode,
                        window: what LongLLaMA's config names), the base model it applies to, and
                        a summary of the training run
Applying a delta to any other base model is refused: the base's config hash must match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..core.config import MemoryConfig
from ..persistence.files import fsync_dir, fsync_tree

__all__ = ["Delta", "save_delta", "read_delta", "apply_delta", "DeltaMismatchError", "DELTA_FILE", "CONFIG_FILE"]

DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "fot_config.json"
_FORMAT = 1


class DeltaMismatchError(ValueError):
    """A delta was applied to a model it was not trained from."""


@dataclass(frozen=True)
class Delta:
    """A read delta: parameter differences and what they were trained for."""

    tensors: dict[str, torch.Tensor]  # parameter name -> trained minus base
    memory_config: MemoryConfig
    base_model_id: str
    base_config_hash: str
    training: dict[str, Any]
    sha256: str  # of delta.safetensors: identifies the delta in store fingerprints

    @property
    def num_parameters(self) -> int:
        return sum(tensor.numel() for tensor in self.tensors.values())


def save_delta(
    path: str | os.PathLike[str],
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    memory_config: MemoryConfig,
    base_fingerprint: Mapping[str, Any],
    training: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write trained - base for the parameters in `trained` into the directory `path`, atomically."""
    path = Path(path)
    missing = sorted(set(trained) - set(base))
    if missing:
        raise KeyError(f"No base values for trained parameters {missing[:3]}...: pass the base model's state.")
    differences = {name: (trained[name].detach().float().cpu() - base[name].float().cpu()).to(dtype).contiguous()
                   for name in sorted(trained)}
    config = {
        "format": _FORMAT,
        "base_model_id": base_fingerprint["model_id"],
        "base_config_hash": base_fingerprint["config_hash"],
        "memory_config": memory_config.to_dict(),
        "trained_parameters": sorted(trained),
        "training": dict(training or {}),
    }
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.mkdir(parents=True)
    try:
        save_file(differences, str(temporary / DELTA_FILE))
        (temporary / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        fsync_tree(temporary)
        if path.exists():
            shutil.rmtree(path)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return path


def read_delta(path: str | os.PathLike[str]) -> Delta:
    path = Path(path)
    if not (path / DELTA_FILE).is_file() or not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a FoT delta: it needs {DELTA_FILE} and {CONFIG_FILE}.")
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    if config.get("format", 0) > _FORMAT:
        raise ValueError(f"{path} was written by a newer fot-memory (format {config['format']}): upgrade fot-memory.")
    return Delta(
        tensors=load_file(str(path / DELTA_FILE)),
        memory_config=MemoryConfig.from_dict(config["memory_config"]),
        base_model_id=config["base_model_id"],
        base_config_hash=config["base_config_hash"],
        training=config.get("training", {}),
        sha256=hashlib.sha256((path / DELTA_FILE).read_bytes()).hexdigest(),
    )


@torch.no_grad()
def apply_delta(model: torch.nn.Module, delta: Delta, config_hash: str) -> None:
    """Add the delta to `model`'s parameters in place; `config_hash` is the model's fingerprint hash."""
    if config_hash != delta.base_config_hash:
        raise DeltaMismatchError(
            f"This delta was trained from {delta.base_model_id} (config hash {delta.base_config_hash[:12]}), "
            f"not from the loaded model (config hash {config_hash[:12]}): load its base model."
        )
    parameters = dict(model.named_parameters())
    unknown = sorted(set(delta.tensors) - set(parameters))
    if unknown:
        raise DeltaMismatchError(f"The model has no parameters {unknown[:3]}: this delta belongs to another model.")
    for name, difference in delta.tensors.items():
        parameter = parameters[name]
        if parameter.shape != difference.shape:
            raise DeltaMismatchError(f"{name}: model {tuple(parameter.shape)} vs delta {tuple(difference.shape)}.")
        parameter.add_(difference.to(device=parameter.device, dtype=parameter.dtype))
