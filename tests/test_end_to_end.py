"""The real default model reads past its window: passkey and a question about a real novel."""

from __future__ import annotations

from pathlib import Path

import pytest

from fot_memory_plugin import MemoryConfig, MemoryEngine
from fot_memory_plugin.apps.passkey import _answer, is_correct, prompt_of_length

pytestmark = pytest.mark.slow

BOOK = Path(__file__).resolve().parents[1] / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = MemoryEngine(smollm2.model, smollm2.tokenizer, MemoryConfig(local_window=512))
    yield engine
    engine.close()


@pytest.mark.parametrize("depth, passkey", [(0.2, 31415), (0.6, 27182)])
def test_memory_finds_a_passkey_the_truncated_model_cannot(engine, depth, passkey):
    prompt_ids = engine.encode(prompt_of_length(engine.tokenizer, 2000, depth, passkey))
    assert prompt_ids.shape[1] > 3 * engine.config.local_window  # the passkey is far outside the window
    with_memory = _answer(engine, prompt_ids, memory=True, max_new_tokens=8)
    truncated = _answer(engine, prompt_ids, memory=False, max_new_tokens=8)
    assert str(passkey) in with_memory and is_correct(with_memory, passkey)
    assert str(passkey) not in truncated


def test_answers_a_question_about_a_novel_from_memory(engine):
    engine.reset()
    tokens = engine.read(BOOK.read_text(encoding="utf-8"))
    assert tokens > 6000 and engine.memory_tokens == tokens
    # Chapter 1 names the tenant; the question is asked ~6,000 tokens later, in an empty window.
    question = "Netherfield Park is let at last, to a young man named Mr."
    answer = engine.answer(question, chat=False, max_new_tokens=6)
    streamed = "".join(engine.stream(engine.encode(question), max_new_tokens=6)).strip()
    engine.reset()
    without_memory = engine.answer(question, chat=False, max_new_tokens=6)
    assert answer.startswith("Bingley")
    assert streamed == answer  # streaming yields the same greedy text
    assert "Bingley" not in without_memory
