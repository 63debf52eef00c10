"""The README's agent blocks run as written (asyncio.run inside), on the real default model.

The llama-index usage block runs first, as a reader would, to make "fot-store" (on chapter 1's
opening instead of chapters 1-4, to keep the test short); then "Agent usage" and "An agent that
remembers its conversations", each exactly as the README prints it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _block(readme: str, heading: str) -> str:
    return re.search(r"```python\n(.*?)```", readme.split(heading, 1)[1], re.S).group(1)


def test_readme_agent_blocks_run_as_written(smollm2, capsys, monkeypatch, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    usage = _block(readme.split("## llama-index integration", 1)[1], "### Usage")
    opening = tmp_path / "pride_and_prejudice_ch1-4.txt"
    opening.write_text((ROOT / "examples/data/pride_and_prejudice_ch1-4.txt").read_text(encoding="utf-8")[:3000])
    usage = usage.replace('"examples/data/pride_and_prejudice_ch1-4.txt"', repr(str(opening)))
    monkeypatch.chdir(tmp_path)  # "fot-store" is made here
    exec(compile(usage, "README.md", "exec"), {})
    capsys.readouterr()

    agent = _block(readme, "### Agent usage")
    assert "asyncio.run(" in agent  # top-level await would be a SyntaxError in exec, as in a script
    exec(compile(agent, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    sys.__stderr__.write("\n".join(printed) + "\n")
    assert printed[0].startswith("[] ")  # the 135M model wrote no ReAct step that calls the tool
    assert len(printed) >= 2

    conversation = _block(readme, "#### An agent that remembers its conversations")
    exec(compile(conversation, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    sys.__stderr__.write(printed)
    assert "[('monday', 1, " in printed
    assert "[conversation monday, turn 1, user] user: I left my bicycle at the north gate, locked with the code 7316." in printed
    answer, source = printed.strip().splitlines()[-1].split(" | ")
    assert "7316" in answer and "7316" in source  # the first source is a turn that holds the code
