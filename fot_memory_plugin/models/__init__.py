"""Model loading, offline: the default SmolLM2 model, any local checkpoint, FoT-tuned deltas.

- `loading.py`: `load_model` (GGUF -> safetensors cache, local paths, hub snapshots already on disk);
- `delta.py`: what a cross-batch training run changed, saved and applied;
- `longllama.py`: LongLLaMA checkpoints (`model_type` "longllama") loaded as Llama, with their memory config;
- `deltas/`: the deltas shipped in the package (`load_model("smollm2-fot")`).
"""

from __future__ import annotations

from .._lazy import lazy_exports

__all__ = [
    "DEFAULT_MODEL",
    "FOT_MODEL",
    "LoadedModel",
    "load_model",
    "model_fingerprint",
    "default_cache_dir",
    "smollm2_gguf_path",
    "Delta",
    "save_delta",
    "read_delta",
    "apply_delta",
]

__getattr__, __dir__ = lazy_exports(__name__, {
    **{name: ".loading" for name in ("DEFAULT_MODEL", "FOT_MODEL", "LoadedModel", "load_model", "model_fingerprint",
                                     "default_cache_dir", "smollm2_gguf_path")},
    **{name: ".delta" for name in ("Delta", "save_delta", "read_delta", "apply_delta")},
})
