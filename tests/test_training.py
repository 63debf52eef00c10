"""FoT cross-batch training on tiny random models: what enters the memory layers, gradients, learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VOCAB, tiny_llama
from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.adapters import adapter_for
from fot_memory_plugin.models.delta import DeltaMismatchError, apply_delta, read_delta
from fot_memory_plugin.models.loading import model_fingerprint
from fot_memory_plugin.training import (
    CrossBatchAttention,
    QuestionMaker,
    ask_in_windows,
    CrossBatchTrainer,
    TokenCorpus,
    TrainConfig,
    cross_batch_memory,
    pair_rows,
    text_files,
    window_losses,
)

WINDOW = 16
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LAYERS = (0, 1)


def _windows(docs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, TINY_VOCAB, (docs, 2 * WINDOW), generator=torch.Generator().manual_seed(seed))
    return ids[:, :WINDOW], ids[:, WINDOW:]


def _row_losses(model, batch: torch.Tensor, group_size: int, layers=LAYERS) -> torch.Tensor:
    """Per-row mean next-token loss (2N,) with cross-batch memory in `layers`."""
    with adapter_for(model, layers, CrossBatchAttention(group_size)):
        logits = model(input_ids=batch, use_cache=False).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
    return losses.mean(dim=1)


def test_cross_batch_memory_groups_previous_windows():
    previous = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 1)  # doc i's keys are all i
    memory = cross_batch_memory(previous, group_size=2)  # (4, 1, 4, 1)
    assert memory[:, 0, :, 0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    with pytest.raises(ValueError, match="groups of 3"):
        cross_batch_memory(previous, group_size=3)


def test_d1_equals_reading_the_previous_window_then_dense_memory():
    """d = 1 is plain attention over [previous window's keys at position 0 || current causal]:
    exactly what inference computes after reading the previous window, when top_k covers memory."""
    model = tiny_llama()
    previous, current = _windows(2, seed=0)
    with torch.no_grad(), adapter_for(model, LAYERS, CrossBatchAttention(1)):
        trained_view = model(input_ids=pair_rows(previous, current), use_cache=False).logits[2:]
    config = MemoryConfig(mem_layers=LAYERS, local_window=WINDOW, top_k=WINDOW, positional_mode="zero")
    for doc in range(2):
        with torch.no_grad(), MemoryEngine(model, None, config) as engine:
            engine.read(previous[doc : doc + 1])
            inference_view = model(input_ids=current[doc : doc + 1]).logits[0]
        torch.testing.assert_close(trained_view[doc], inference_view, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_size, changes", [(1, False), (2, True)])
def test_negatives_enter_memory_attention_only_when_d_above_1(group_size, changes):
    model = tiny_llama()
    previous, current = _windows(2, seed=1)
    perturbed = previous.clone()
    perturbed[1] = torch.randint(0, TINY_VOCAB, (WINDOW,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = _row_losses(model, pair_rows(previous, current), group_size)
        after = _row_losses(model, pair_rows(perturbed, current), group_size)
    # Document 0's current window: its loss moves with document 1's previous window iff d > 1.
    assert (not torch.equal(before[2], after[2])) == changes
    assert not torch.equal(before[3], after[3])  # document 1 always sees its own previous window


def test_gradients_reach_previous_windows_keys_through_memory():
    model = tiny_llama()
    batch = pair_rows(*_windows(2, seed=2))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["keys"] = output

    hook = model.model.layers[1].self_attn.k_proj.register_forward_hook(keep)
    try:
        for memory, expect_gradient in ((True, True), (False, False)):
            model.zero_grad()
            if memory:
                with adapter_for(model, LAYERS, CrossBatchAttention(2)):
                    current_loss = window_losses(model, batch).current
            else:
                current_loss = window_losses(model, batch).current
            current_loss.backward()
            previous_rows_gradient = captured["keys"].grad[:2].abs().sum()
            # Only the memory path connects the current windows' loss to previous windows' keys.
            assert (previous_rows_gradient > 0) == expect_gradient
            assert (model.model.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0)
    finally:
        hook.remove()


def _bag_corpus(docs: int = 256, vocabulary: int = 4, length: int = 6 * WINDOW, seed: int = 0) -> TokenCorpus:
    """Documents that each draw their tokens from their own few words: a previous window tells the
    current one which words to expect."""
    rng = np.random.default_rng(seed)
    texts = [rng.choice(rng.choice(TINY_VOCAB, vocabulary, replace=False), length).astype(np.int32) for _ in range(docs)]
    offsets = np.concatenate([[0], np.cumsum([len(text) for text in texts])]).astype(np.int64)
    return TokenCorpus(np.concatenate(texts), offsets, [f"doc{i}" for i in range(docs)])


def _config(**overrides) -> TrainConfig:
    settings = dict(mem_layers=LAYERS, window=WINDOW, batch_docs=4, group_schedule=((0.0, 2), (0.5, 4)),
                    steps=40, learning_rate=1e-2, warmup_steps=2, trainable="all", checkpoint_every=0)
    return TrainConfig(**(settings | overrides))


def test_a_few_steps_lower_the_loss():
    model = tiny_llama()
    with CrossBatchTrainer(model, _bag_corpus(), _config(steps=20, batch_docs=8)) as trainer:
        batch, answers = trainer.batch()
        assert answers is None  # nothing asked: the plain cross-batch loss
        trainer.handler.group_size = 2
        with torch.no_grad():
            before = torch.stack(window_losses(model, batch)[:2])
        log = trainer.train(progress=False)
        trainer.handler.group_size = 2
        with torch.no_grad():
            after = torch.stack(window_losses(model, batch)[:2])
    assert (after < before - 0.05).all(), (before, after)  # previous and current windows both improve
    assert [entry["d"] for entry in log][0] == 2 and log[-1]["d"] == 4  # the d schedule was followed


def test_resume_continues_exactly(tmp_path):
    corpus = _bag_corpus()
    straight = tiny_llama(seed=3)
    with CrossBatchTrainer(straight, corpus, _config(steps=6)) as trainer:
        trainer.train(progress=False)

    interrupted = tiny_llama(seed=3)
    with CrossBatchTrainer(interrupted, corpus, _config(steps=6, checkpoint_every=100), out_dir=tmp_path) as trainer:
        trainer.train(progress=False, until=3)  # as if stopped there: a checkpoint at step 3
    resumed = tiny_llama(seed=99)  # other weights: everything trainable comes from the checkpoint
    with CrossBatchTrainer(resumed, corpus, _config(steps=6, checkpoint_every=100), out_dir=tmp_path) as trainer:
        assert trainer.train(progress=False)[-1]["step"] == 5
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, msg=name)

    with pytest.raises(ValueError, match="other settings"):
        CrossBatchTrainer(tiny_llama(), corpus, _config(learning_rate=0.5), out_dir=tmp_path).resume()


def test_memory_attention_delta_is_small_and_reapplies(tmp_path):
    base = tiny_llama(num_layers=4, seed=5)
    base_state = {name: p.detach().clone() for name, p in base.named_parameters()}
    config = _config(mem_layers=(1, 3), trainable="memory-attention", steps=5)
    with CrossBatchTrainer(base, _bag_corpus(), config) as trainer:
        trainer.train(progress=False)
        path = trainer.save_delta(tmp_path / "delta", base_state, model_fingerprint(base, "tiny"))
    changed = {name for name, p in base.named_parameters() if not torch.equal(p, base_state[name])}
    assert changed and all(".layers.1.self_attn." in n or ".layers.3.self_attn." in n for n in changed)

    delta = read_delta(path)
    assert set(delta.tensors) == changed
    assert delta.memory_config.mem_layers == (1, 3) and delta.memory_config.positional_mode == "zero"
    fresh = tiny_llama(num_layers=4, seed=5)
    apply_delta(fresh, delta, model_fingerprint(fresh, "tiny")["config_hash"])
    for (name, trained), applied in zip(base.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(applied, trained, atol=1e-3, rtol=1e-3, msg=name)

    # generating without memory uses the base weights; the tuned ones come back afterwards
    original = tiny_llama(num_layers=4, seed=5)
    ids = torch.randint(0, original.config.vocab_size, (1, 12))
    with MemoryEngine(fresh, None, MemoryConfig(mem_layers=(1, 3), local_window=16),
                      base_weights={name: base_state[name] for name in changed}) as engine:
        with engine.base_model() as model, torch.no_grad():
            torch.testing.assert_close(model(ids).logits, original(ids).logits)
        for (name, trained), restored in zip(base.named_parameters(), fresh.parameters()):
            torch.testing.assert_close(restored, trained, atol=1e-3, rtol=1e-3, msg=name)

    other = tiny_llama(num_layers=3)
    with pytest.raises(DeltaMismatchError, match="not from the loaded model"):
        apply_delta(other, delta, model_fingerprint(other, "tiny")["config_hash"])


def test_config_refuses_group_sizes_that_do_not_divide_the_batch():
    with pytest.raises(ValueError, match="must divide batch_docs"):
        TrainConfig(batch_docs=6, group_schedule=((0.0, 4),))
    assert _config(steps=10).group_size(0) == 2 and _config(steps=10).group_size(5) == 4


class _CharTokenizer:
    """Bytes as tokens: enough to test tokenizing and caching without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return type("Encoded", (), {"input_ids": list(text.encode())})()

    def __len__(self):
        return 256


def test_corpus_from_files_caches_and_holds_out(tmp_path):
    for name, text in {"a.txt": "x" * 100, "b.txt": "y" * 80, "held.txt": "z" * 90}.items():
        (tmp_path / name).write_text(text)
    files = text_files([tmp_path], hold_out=["held"])
    assert [f.name for f in files] == ["a.txt", "b.txt"]
    corpus = TokenCorpus.from_files(files, _CharTokenizer(), cache_dir=tmp_path / "cache")
    assert corpus.lengths.tolist() == [100, 80] and len(list((tmp_path / "cache").iterdir())) == 1
    again = TokenCorpus.from_files(files, _CharTokenizer(), cache_dir=tmp_path / "cache")
    assert np.array_equal(again.tokens, corpus.tokens) and again.names == corpus.names

    previous, current = corpus.sample_windows(2, 20, torch.Generator().manual_seed(0))
    assert previous.shape == current.shape == (2, 20)
    assert {int(previous[0, 0]), int(previous[1, 0])} == {ord("x"), ord("y")}  # two different documents
    with pytest.raises(ValueError, match="lower --batch-docs"):
        corpus.sample_windows(3, 20, torch.Generator())
    with pytest.raises(ValueError, match="matches no training file"):
        text_files([tmp_path], hold_out=["nope"])


def test_memory_perplexity_scores_the_same_predictions_with_and_without_memory():
    from fot_memory_plugin.apps.perplexity import memory_perplexity

    model = tiny_llama()
    ids = torch.randint(0, TINY_VOCAB, (1, 5 * WINDOW), generator=torch.Generator().manual_seed(4))
    config = MemoryConfig(local_window=WINDOW, top_k=4)
    with MemoryEngine(model, None, config) as engine:
        truncated = memory_perplexity(engine, ids, 0, 2 * WINDOW, truncated=True)
        with_memory = memory_perplexity(engine, ids, 3 * WINDOW, 2 * WINDOW)
        assert engine.memory_tokens == 0  # scoring leaves the engine empty
    with torch.no_grad():
        windows = ids[:, 3 * WINDOW :].view(2, WINDOW)
        logits = model(windows).logits[:, :-1]
        expected = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert truncated.scored_tokens == with_memory.scored_tokens == 2 * (WINDOW - 1)
    assert truncated.loss == pytest.approx(expected.item(), rel=1e-5)
    assert with_memory.loss != pytest.approx(truncated.loss)  # memory changed the predictions
    with pytest.raises(ValueError, match="exceed"):
        memory_perplexity(MemoryEngine(tiny_llama(), None, config), ids, 5 * WINDOW, WINDOW)


def test_memory_perplexity_can_fill_memory_as_a_reading_without_retrieval_does():
    from fot_memory_plugin.apps.perplexity import memory_perplexity

    ids = torch.randint(0, TINY_VOCAB, (1, 5 * WINDOW), generator=torch.Generator().manual_seed(5))
    with MemoryEngine(tiny_llama(), None, MemoryConfig(local_window=WINDOW, top_k=4)) as engine:
        retrieving = memory_perplexity(engine, ids, 3 * WINDOW, 2 * WINDOW)
        local_keys = memory_perplexity(engine, ids, 3 * WINDOW, 2 * WINDOW, read_retrieval=False)
        # The same by hand: memory filled window by window without retrieval, predictions retrieving.
        engine.read(ids[:, : 3 * WINDOW], retrieve=False)
        losses = []
        with torch.no_grad():
            for start in (3 * WINDOW, 4 * WINDOW):
                piece = ids[:, start : start + WINDOW]
                logits = engine.model(input_ids=piece, use_cache=False).logits[0, :-1]
                losses.append(F.cross_entropy(logits, piece[0, 1:], reduction="sum").item())
                engine.read(piece, retrieve=False)
        engine.reset()
    assert local_keys.loss == pytest.approx(sum(losses) / local_keys.scored_tokens, rel=1e-5)
    assert local_keys.loss != pytest.approx(retrieving.loss)  # later windows' keys differ


@pytest.mark.slow
def test_train_command_writes_a_delta_that_load_model_applies(smollm2, tmp_path):
    from fot_memory_plugin.apps.cli import main
    from fot_memory_plugin.models.loading import load_model

    for number in range(4):  # real prose: four speeches, each one training document
        source = sorted((SHARED_DATA / "sotu").glob("*.txt"))[number]
        (tmp_path / source.name).write_text(source.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    out = tmp_path / "run"
    code = main(["train", str(tmp_path), "--out", str(out), "--steps", "2", "--batch-docs", "2", "--window", "32",
                 "--group-schedule", "1@0,2@0.5", "--mem-layers", "3,7", "--checkpoint-every", "1"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_done"] == 2 and summary["documents"] == 4 and summary["delta_bytes"] < 4_000_000

    tuned = load_model(delta=out / "delta")
    assert tuned.memory_config.mem_layers == (3, 7) and tuned.memory_config.local_window == 32
    assert tuned.model_id.startswith(smollm2.model_id + "+fot-")
    base = dict(smollm2.model.named_parameters())
    changed = {name for name, p in tuned.model.named_parameters() if not torch.equal(p, base[name])}
    assert changed and all(".layers.3.self_attn." in name or ".layers.7.self_attn." in name for name in changed)
    assert set(tuned.base_weights) == set(read_delta(out / "delta").tensors) >= changed
    assert all(torch.equal(tuned.base_weights[name], base[name].float()) for name in tuned.base_weights)


@pytest.mark.slow
def test_shipped_fot_delta_is_small_and_names_its_memory_layers(smollm2):
    from fot_memory_plugin.models.delta import read_delta
    from fot_memory_plugin.models.loading import BUNDLED_DELTAS, FOT_MODEL, load_model

    path = BUNDLED_DELTAS[FOT_MODEL][1]
    assert sum(file.stat().st_size for file in path.iterdir()) <= 20_000_000
    delta = read_delta(path)
    tuned = load_model(FOT_MODEL)
    assert tuned.memory_config == delta.memory_config
    assert len(delta.memory_config.mem_layers) <= 30 // 5  # a fifth of the layers or fewer: 5x smaller stores
    base = dict(smollm2.model.named_parameters())
    changed = {name for name, p in tuned.model.named_parameters() if not torch.equal(p, base[name])}
    assert changed == set(delta.tensors)


@pytest.mark.slow
def test_a_store_read_by_the_fot_model_keeps_only_its_memory_layers(smollm2, tmp_path):
    from fot_memory_plugin.documents.document_memory import DocumentMemory
    from fot_memory_plugin.models.loading import FOT_MODEL
    from fot_memory_plugin.training import DEFAULT_MEM_LAYERS

    text = (Path(__file__).resolve().parents[1] / "examples" / "data" / "pride_and_prejudice_ch1-4.txt").read_text()
    with DocumentMemory.open(tmp_path / "store", model=FOT_MODEL) as memory:
        layers = memory.engine.layers
        record, fresh = memory.read_text(text[:3000], name="opening")
    assert fresh and layers == DEFAULT_MEM_LAYERS and tuple(record.layers) == layers
    with DocumentMemory.open(tmp_path / "store", readonly=True) as reopened:  # the store remembers the model
        assert reopened.engine.layers == layers
        answer = reopened.ask("Mr. Bennet's wife told him that Netherfield Park", chat=False, max_new_tokens=4)
    assert answer.text and answer.sources and all(source.doc == "opening" for source in answer.sources)


@pytest.mark.slow
def test_eval_perplexity_command(smollm2, capsys):
    from fot_memory_plugin.apps.cli import main

    text = Path(__file__).resolve().parents[1] / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
    assert main(["eval", "perplexity", str(text), "--memory-sizes", "512", "--scored", "256", "--local-window", "128",
                 "--model", "smollm2-fot", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["truncated"] for r in results] == [True, False] and results[1]["memory_tokens"] == 512
    assert all(1 < r["perplexity"] < 1000 and r["scored_tokens"] == 2 * 127 for r in results)


def test_the_answer_loss_scores_only_the_marked_tokens():
    model = tiny_llama()
    batch = pair_rows(*_windows(2, seed=3))
    answers = torch.zeros_like(batch, dtype=torch.bool)
    answers[2, 5:8] = True  # three answer tokens in the first current window
    with torch.no_grad():
        losses = window_losses(model, batch, answers)
        logits = model(input_ids=batch, use_cache=False).logits
    expected = F.cross_entropy(logits[2, 4:7], batch[2, 5:8])  # token t is predicted at position t - 1
    assert losses.answer == pytest.approx(expected.item(), rel=1e-5)
    assert window_losses(model, batch, torch.zeros_like(answers)).answer is None
    with pytest.raises(ValueError, match="tokenizer"):
        CrossBatchTrainer(model, _bag_corpus(), _config(question_probability=0.5))


def _book_windows(tokenizer, docs: int, window: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive (previous, current) windows from a held-in training book."""
    ids = tokenizer((SHARED_DATA / "books" / "emma.txt").read_text(encoding="utf-8")[20_000:200_000],
                    add_special_tokens=False).input_ids
    spans = torch.tensor([ids[i * 2 * window : (i + 1) * 2 * window] for i in range(docs)])
    return spans[:, :window].clone(), spans[:, window:].clone()


@pytest.mark.slow
def test_questions_ask_about_a_fact_that_only_the_previous_window_holds(smollm2):
    import random

    tokenizer = smollm2.tokenizer
    maker = QuestionMaker(tokenizer)
    previous, _ = _book_windows(tokenizer, 24)
    seen = set()
    for number, window in enumerate(previous):
        question = maker.make(window, random.Random(number), max_tokens=128)
        assert question is not None
        seen.add((question.kind, question.form))
        remembered = tokenizer.decode(question.previous if question.previous is not None else window.tolist())
        answer = tokenizer.decode(question.answer).replace("<|im_end|>", "").strip()
        asked = tokenizer.decode(question.prompt)
        assert answer and answer in remembered  # the answer lies in memory...
        if question.form == "question":
            assert asked.rstrip().endswith("<|im_start|>assistant") and tokenizer.decode(question.answer).endswith("<|im_end|>")
        if question.kind == "cloze":  # ...right after the words the question quotes
            end = asked.rfind(' ..."') if ' ..."' in asked else asked.rfind('"?')  # the quote's end
            prefix = asked[:end] if question.form == "question" else asked
            assert " ".join(prefix.split()[-4:]) + " " + answer in " ".join(remembered.split())
        else:  # an invented fact, written whole into the previous window at a sentence start
            assert len(question.previous) == len(window) and answer not in tokenizer.decode(window.tolist())
    assert seen == {(kind, form) for kind in ("cloze", "fact") for form in ("completion", "question")}


@pytest.mark.slow
def test_ask_in_windows_starts_current_windows_with_the_question_and_marks_its_answer(smollm2):
    tokenizer = smollm2.tokenizer
    previous, current = _book_windows(tokenizer, 8)
    original = current.clone()
    answers = ask_in_windows(QuestionMaker(tokenizer), previous, current, 1.0, torch.Generator().manual_seed(0))
    assert current.shape == original.shape and answers.any(dim=1).all()  # every document asked
    for doc in range(8):
        marked = answers[doc].nonzero().flatten()
        start, end = int(marked[0]), int(marked[-1]) + 1
        assert marked.tolist() == list(range(start, end))  # one contiguous answer, right after the prompt
        assert torch.equal(current[doc, end:], original[doc, : 256 - end])  # then the document's own text
    untouched = ask_in_windows(QuestionMaker(tokenizer), previous, current.clone(), 0.0, torch.Generator())
    assert not untouched.any()


@pytest.mark.slow
def test_train_from_the_shipped_delta_with_questions_writes_a_delta_against_the_base(smollm2, tmp_path, capsys):
    from fot_memory_plugin.apps.cli import main
    from fot_memory_plugin.models.loading import BUNDLED_DELTAS, FOT_MODEL, load_model

    for number in range(4):
        source = sorted((SHARED_DATA / "sotu").glob("*.txt"))[number]
        (tmp_path / source.name).write_text(source.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    shipped = BUNDLED_DELTAS[FOT_MODEL][1]
    out = tmp_path / "run"
    code = main(["train", str(tmp_path), "--out", str(out), "--steps", "2", "--batch-docs", "2", "--window", "128",
                 "--group-schedule", "1@0", "--question-probability", "1", "--init-delta", str(shipped),
                 "--lr", "1e-3", "--warmup-steps", "1"])
    assert code == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(entry["answer_loss"] is not None for entry in log)
    assert json.loads((out / "summary.json").read_text())["init_delta"] == read_delta(shipped).sha256
    tuned, start = load_model(out / "delta"), load_model(FOT_MODEL)  # a delta directory names a model
    assert tuned.model_id.startswith(smollm2.model_id + "+fot-")
    trained = set(read_delta(shipped).tensors)
    base = dict(smollm2.model.named_parameters())
    for name, parameter in tuned.model.named_parameters():
        if name not in trained:
            assert torch.equal(parameter, base[name])
    # the new delta holds the shipped delta's change plus two small steps, measured from the base
    moved = {name: (parameter - dict(start.model.named_parameters())[name]).abs().max().item()
             for name, parameter in tuned.model.named_parameters() if name in trained}
    shipped_change = {name: delta.abs().max().item() for name, delta in read_delta(shipped).tensors.items()}
    assert all(moved[name] < 0.5 * shipped_change[name] for name in trained)
    refused = main(["train", str(tmp_path), "--out", str(tmp_path / "other"), "--steps", "1", "--batch-docs", "2",
                    "--window", "64", "--group-schedule", "1@0", "--mem-layers", "3,7", "--init-delta", str(shipped)])
    assert refused != 0 and "does not train" in capsys.readouterr().err
    assert not (tmp_path / "other" / "delta").exists()
