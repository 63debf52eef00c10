"""The README's Ray example runs as written, on a local Ray cluster, with a tiny model and short files."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import BOOK

ROOT = Path(__file__).resolve().parents[1]


def test_readme_ray_example_runs(ray_cluster, tiny_model_dir, tmp_path, capsys, monkeypatch):
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Beyond one machine", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    book = BOOK.read_text(encoding="utf-8")
    for index, name in enumerate(["emma.txt", "persuasion.txt"]):
        (tmp_path / name).write_text(book[index * 1500 : index * 1500 + 1500], encoding="utf-8")
    code = code.replace('"smollm2-fot"', repr(str(tiny_model_dir)))  # the tiny random model reads in seconds
    monkeypatch.chdir(tmp_path)  # the files and stores named in the block live here
    exec(compile(code, "README.md", "exec"), {})  # ray_address="auto": the cluster this process joined
    assert capsys.readouterr().out.strip()  # an answer (the random model's words)
    assert (tmp_path / "lib-shards" / "catalog.json").exists()
