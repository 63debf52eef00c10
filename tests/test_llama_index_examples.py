"""The llama-index example apps run offline, end to end, on the real default model and a short
real document (the README runs them in full)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "examples" / "data" / "pride_and_prejudice_ch1-4.txt"
QUESTION = "Netherfield Park is let at last, to a young man named Mr."


@pytest.fixture(scope="module")
def short_document(tmp_path_factory) -> Path:
    """Chapter 1's first ~3,000 characters (about 800 tokens, two reading windows)."""
    path = tmp_path_factory.mktemp("docs") / "chapter1.txt"
    path.write_text(BOOK.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


def _example(name: str, *args: str) -> str:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_persistent_memory_reads_in_one_process_and_answers_in_another(tmp_path, short_document, smollm2):
    store = str(tmp_path / "store")
    read = _example("persistent_memory.py", "--store", store, "read", str(short_document))
    asked = _example("persistent_memory.py", "--store", store, "ask", QUESTION)
    read_pid = re.search(r"\[read, pid (\d+)\]", read).group(1)
    ask_pid = re.search(r"\[ask, pid (\d+)\]", asked).group(1)
    assert read_pid != ask_pid and "chapter1.txt:" in read and f"llama-index id {short_document}" in read
    answer = re.search(r"^A: (.*)$", asked, re.M).group(1)
    assert answer.startswith("Bingley")
    assert f"source: chapter1.txt (id {short_document})" in asked


def test_agent_document_memories_survive_a_restart(tmp_path, short_document, smollm2):
    out = _example("agent_with_memory.py", "--store", str(tmp_path / "store"), "--document", str(short_document),
                   "--max-new-tokens", "24")
    sessions = out.split("[pid ")[1:]
    assert len(sessions) == 2
    assert "read into a new store: chapter1.txt" in sessions[0] and "chat history from earlier sessions: 0" in sessions[0]
    assert "reopened the store: chapter1.txt" in sessions[1]
    assert int(re.search(r"earlier sessions: (\d+)", sessions[1]).group(1)) >= 2  # the first session's turn
    for session in sessions:
        assert "Passages the question attends to:" in session and "agent: " in session


def test_rag_vs_memory_answers_both_ways_with_sources(tmp_path, short_document, smollm2):
    rag_vs_memory = _load("rag_vs_memory.py")
    out = _example("rag_vs_memory.py", "--store", str(tmp_path / "store"), "--document", str(short_document),
                   "--question", rag_vs_memory.QUESTIONS[0])
    fot = re.search(r"FoT memory +[\d.]+ s +A: (.*)", out).group(1)
    rag = re.search(r"RAG, QA prompt +[\d.]+ s +A: (.*)", out).group(1)
    completion = re.search(r"RAG, completion +[\d.]+ s +A: (.*)", out).group(1)
    assert fot.startswith("Bingley") and rag and completion  # RAG's answers are shown whatever they are
    assert out.count("source chars") == 3
