"""The README's main job, examples/long_document_qa.py, runs offline on the real default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "long_document_qa.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("long_document_qa", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_long_document_qa_reads_once_and_answers_with_sources(tmp_path, capsys, smollm2):
    example = _load_example()
    store = tmp_path / "store"
    question = example.QUESTIONS[0]
    assert example.main(["--store", str(store), "--question", question]) == 0
    first = capsys.readouterr().out
    assert "tokens, read in" in first
    answers = {line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in first.splitlines() if line.startswith("A (")}
    assert answers["A (passages)"].strip().startswith("Bingley")  # the default answer mode
    assert answers["A (memory)"].strip().startswith("Bingley")
    assert answers["A (reread)"].strip().startswith("Bingley")
    assert "Bingley" not in answers["A (no memory)"]
    assert "source: chars" in first
    # A second run (a new store object over the same directory) finds the document stored.
    assert example.main(["--store", str(store), "--question", question, "--no-compare"]) == 0
    assert "already stored" in capsys.readouterr().out
