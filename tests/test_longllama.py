"""LongLLaMA checkpoints load through load_model(path) onto the Llama adapter, no remote code.

No LongLLaMA weights are on this machine, so each test writes a tiny random checkpoint in the
published format: config.json with model_type "longllama" and LongLLaMA's keys (mem_layers,
last_context_length, mem_positionals, mem_dtype, mem_attention_grouping, torch_attention,
gradient_checkpoint_every_ith, auto_map naming remote code that must never run), Llama's
parameter names (plus the rotary inv_freq buffers older LongLLaMA checkpoints carry), and a
tokenizer. The loaded model must read and answer exactly like the plain Llama model with the
same weights under the equivalent MemoryConfig.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.documents.document_memory import DocumentMemory
from fot_memory_plugin.core.errors import MissingDependencyError, UnsupportedCheckpointError
from fot_memory_plugin.models.loading import load_model

WORDS = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(45)]
WINDOW = 16  # LongLLaMA's max_position_embeddings: the window long inputs are read in
LAST_CONTEXT = 8
MEM_LAYERS = [1, 2]


def _weights() -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A random 3-layer multi-head Llama (LongLLaMA has no grouped-query attention) and its weights."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=WINDOW,
                         rope_theta=500.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    return config, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _longllama_config(**changes) -> dict:
    """config.json as LongLLaMA's configuration_longllama.py writes it (keys and spelling)."""
    return {
        "architectures": ["LongLlamaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_longllama.LongLlamaConfig",
                     "AutoModelForCausalLM": "modeling_longllama.LongLlamaForCausalLM"},
        "model_type": "longllama",
        "vocab_size": len(WORDS), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "hidden_act": "silu", "max_position_embeddings": WINDOW,
        "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": 0,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "rope_theta": 500.0,
        "rope_scaling": None, "last_context_length": LAST_CONTEXT, "mem_layers": MEM_LAYERS,
        "mem_positionals": True, "mem_dtype": "bfloat16", "mem_attention_grouping": [4, 64],
        "torch_attention": False, "gradient_checkpoint_every_ith": 1, "torch_dtype": "float32",
        "transformers_version": "4.33.2",
    } | changes


def _tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def write_checkpoint(directory: Path, weights: dict[str, torch.Tensor], *, file: str = "model.safetensors",
                     **config_changes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(_longllama_config(**config_changes), indent=2))
    tensors = dict(weights)
    head_dim = 32 // 4
    for layer in range(3):  # older LongLLaMA checkpoints saved the rotary buffer as a weight
        tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            500.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if file.endswith(".safetensors"):
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(directory / file))
    else:
        torch.save(tensors, directory / file)
    _tokenizer().save_pretrained(directory)
    # The remote code config.json's auto_map names: loading must never run it.
    for module in ("configuration_longllama.py", "modeling_longllama.py"):
        (directory / module).write_text('raise RuntimeError("LongLLaMA remote code was run")\n')
    return directory


@pytest.fixture(scope="module")
def weights():
    return _weights()


@pytest.mark.parametrize("file", ["model.safetensors", "pytorch_model.bin"])
def test_longllama_checkpoint_loads_as_llama_with_its_memory_layers(tmp_path, weights, file):
    path = write_checkpoint(tmp_path / "long_llama_tiny", weights[1], file=file)
    with pytest.raises(ValueError):  # transformers alone needs trust_remote_code for this config
        AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)

    loaded = load_model(path)
    assert isinstance(loaded.model, LlamaForCausalLM) and loaded.model.config.model_type == "llama"
    assert loaded.memory_config == MemoryConfig(mem_layers=(1, 2), local_window=WINDOW, last_context_length=LAST_CONTEXT,
                                                positional_mode="zero", mem_dtype="bfloat16", mem_attention_grouping=64)
    assert loaded.model.config.rope_parameters["rope_theta"] == 500.0
    for name, tensor in weights[1].items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    config = loaded.memory_config_for(MemoryConfig(top_k=4))
    assert (config.mem_layers, config.local_window, config.context_length, config.top_k) == ((1, 2), WINDOW, LAST_CONTEXT, 4)


def test_longllama_reads_and_answers_like_the_equivalent_memory_config(tmp_path, weights):
    llama_config, state = weights
    loaded = load_model(write_checkpoint(tmp_path / "long_llama_tiny", state))
    plain = LlamaForCausalLM(llama_config).eval()
    plain.load_state_dict(state)
    equivalent = MemoryConfig(mem_layers=(1, 2), local_window=WINDOW, last_context_length=LAST_CONTEXT,
                              positional_mode="zero", top_k=6)
    document = torch.randint(3, len(WORDS), (1, 5 * WINDOW + 3), generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(3, len(WORDS), (1, LAST_CONTEXT + 5), generator=torch.Generator().manual_seed(2))
    outputs = []
    for model in (loaded.model, plain):
        with MemoryEngine(model, loaded.tokenizer, loaded.memory_config_for(MemoryConfig(top_k=6))
                          if model is loaded.model else equivalent) as engine:
            assert engine.layers == (1, 2)
            engine.read(document)
            keys = {layer: engine.memories[layer].keys.clone() for layer in engine.layers}
            new = engine.generate(prompt, max_new_tokens=6)  # the prompt's head goes to memory first
            outputs.append((keys, new, engine.memory_tokens))
    (keys_a, new_a, tokens_a), (keys_b, new_b, tokens_b) = outputs
    assert tokens_a == tokens_b == document.shape[1] + prompt.shape[1] - LAST_CONTEXT
    for layer in (1, 2):
        torch.testing.assert_close(keys_a[layer], keys_b[layer])
    assert new_a.tolist() == new_b.tolist()


def test_a_store_reads_with_the_checkpoints_memory_layers(tmp_path, weights):
    path = write_checkpoint(tmp_path / "long_llama_tiny", weights[1])
    text = " ".join(f"w{i % 45}" for i in range(7 * WINDOW))
    with DocumentMemory.open(tmp_path / "store", model=str(path)) as memory:
        assert memory.engine.layers == (1, 2)
        assert memory.engine.config.local_window == WINDOW and memory.engine.config.context_length == LAST_CONTEXT
        record, _ = memory.read_text(text, name="words.txt")
        answer = memory.ask("w1 w2 w3", chat=False, max_new_tokens=3, exact=True)
    assert record.layers == (1, 2) and record.num_tokens == 7 * WINDOW
    assert answer.sources and answer.sources[0].doc == "words.txt"
    with DocumentMemory.open(tmp_path / "store") as again:  # the store remembers the checkpoint and its layers
        assert again.engine.layers == (1, 2)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mem_positionals": False}, "mem_positionals false"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"mem_layers": [1, 7]}, r"mem_layers \[7\] do not exist"),
])
def test_checkpoints_we_cannot_compute_are_refused(tmp_path, weights, changes, message):
    path = write_checkpoint(tmp_path / "long_llama_tiny", weights[1], **changes)
    with pytest.raises((UnsupportedCheckpointError, ValueError), match=message):
        load_model(path)


def test_a_checkpoint_missing_weights_is_refused(tmp_path, weights):
    state = {name: tensor for name, tensor in weights[1].items() if "layers.2." not in name}
    with pytest.raises(UnsupportedCheckpointError, match="lacks the weights"):
        load_model(write_checkpoint(tmp_path / "long_llama_tiny", state))


def test_without_memory_layers_it_is_a_zero_shot_model(tmp_path, weights):
    loaded = load_model(write_checkpoint(tmp_path / "long_llama_tiny", weights[1], mem_layers=[]))
    assert loaded.memory_config is None


def _sentencepiece_checkpoint(tmp_path: Path, weights) -> tuple[Path, int]:
    """A checkpoint whose tokenizer is a SentencePiece model only (tokenizer.model), as LongLLaMA's."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the passkey is {i} and the grass is green" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=-1)
    path = write_checkpoint(tmp_path / "long_llama_sp", weights[1], vocab_size=len(WORDS))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    (path / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048}))
    return path, 40


def test_a_sentencepiece_tokenizer_loads_as_longllama_ships_it(tmp_path, weights):
    path, vocab = _sentencepiece_checkpoint(tmp_path, weights)
    loaded = load_model(path)
    assert type(loaded.tokenizer).__name__ == "LlamaTokenizer"
    ids = loaded.tokenizer("the passkey is 7", add_special_tokens=False).input_ids
    assert ids and max(ids) < vocab
    with MemoryEngine(loaded.model, loaded.tokenizer, loaded.memory_config_for(MemoryConfig())) as engine:
        engine.read("the grass is green " * 20)
        assert engine.answer("the passkey is", chat=False, max_new_tokens=2) is not None


def test_a_sentencepiece_tokenizer_without_the_package_says_what_to_install(tmp_path, weights, monkeypatch):
    path = write_checkpoint(tmp_path / "long_llama_sp", weights[1])
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.model").write_bytes(b"a SentencePiece model")  # refused before it is read
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if it were not installed
    with pytest.raises(MissingDependencyError, match="pip install sentencepiece"):
        load_model(path)
