"""The command line's Ray side: `read --ray`, `shard`, `ask --ray` on a real local Ray cluster
(in this process: the CLI joins the cluster the session started), and `--ray` without Ray
installed saying what to install."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import BOOK, QUESTION
from fot_memory_plugin.apps.cli import main


def _run(capsys, *args: str) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_read_shard_and_ask_on_ray_answer_as_the_plain_commands(ray_cluster, tmp_path, tiny_model_dir, capsys):
    book = BOOK.read_text(encoding="utf-8")
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"doc{index}.txt")
        paths[-1].write_text(book[index * 1200 : index * 1200 + 1200], encoding="utf-8")
    store, shards = tmp_path / "store", tmp_path / "shards"
    read = _run(capsys, "read", *map(str, paths), "--store", str(store), "--model", str(tiny_model_dir),
                "--local-window", "64", "--json", "--ray")
    assert sorted(read["read"]) == sorted(path.name for path in paths) and not read["failed"]
    assert main(["shard", str(store), "--shards", "2", str(shards)]) == 0
    assert "catalog" in capsys.readouterr().out
    ask = ["ask", QUESTION, "--no-chat", "--max-new-tokens", "5", "--json"]
    plain = _run(capsys, *ask, "--store", str(store))
    sharded = _run(capsys, *ask, "--store", str(shards), "--ray")
    assert sharded == plain and plain["sources"]


def test_ray_options_without_ray_say_what_to_install(tmp_path):
    document = tmp_path / "a.txt"
    document.write_text("Some text to read.", encoding="utf-8")
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed
            "import fot_memory_plugin.apps.cli as cli\n"
            "assert 'ray' not in {m for m in sys.modules if sys.modules[m] is not None}\n"
            f"sys.exit(cli.main(['read', {str(document)!r}, '--store', {str(tmp_path / 's')!r}, '--ray']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install 'fot-memory-plugin[ray]'" in done.stderr
