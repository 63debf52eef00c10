"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_readme_usage_example_runs(smollm2, capsys, monkeypatch):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    usage = readme.split("## Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    monkeypatch.chdir(ROOT)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "tokens in memory" in printed
    assert "Bingley" in printed


def test_readme_llama_index_usage_runs(smollm2, capsys, monkeypatch, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## llama-index integration", 1)[1].split("### Usage", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # The block as written, on chapter 1's opening (~800 tokens) instead of chapters 1-4, to keep
    # the test short (test_examples.py reads chapters 1-4 through the same calls).
    opening = tmp_path / "pride_and_prejudice_ch1-4.txt"
    opening.write_text((ROOT / "examples/data/pride_and_prejudice_ch1-4.txt").read_text(encoding="utf-8")[:3000])
    code = code.replace('"examples/data/pride_and_prejudice_ch1-4.txt"', repr(str(opening)))
    monkeypatch.chdir(ROOT)
    exec(compile(code.replace('"fot-store"', repr(str(tmp_path / "store"))), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("Bingley")
    assert "pride_and_prejudice_ch1-4.txt" in printed
    assert (tmp_path / "store" / "memory.sqlite").exists()
