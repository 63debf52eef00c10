"""The `fot-memory` command as a person meets it: help at once, a version, defaults shown, one
--device text, inputs checked before any model loads, and commands that only read or remove
never creating a store. No model is loaded here: every refusal comes first."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fot_memory_plugin import __version__
from fot_memory_plugin.apps.cli import build_parser, main

NO_MODEL = "/nonexistent/model"  # a model option that would fail if anything tried to load it


def _subparsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {prefix.strip(): parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_subparsers(sub, f"{prefix}{name} "))
    return found


@pytest.mark.parametrize("argv", [["--help"], ["read", "--help"], ["ask", "--help"], ["train", "--help"],
                                  ["eval", "passkey", "--help"], ["--version"]])
def test_help_and_version_import_no_torch(argv):
    """--help is fast because nothing heavy is imported: no torch, transformers, hnswlib or ray."""
    code = ("import sys\nfrom fot_memory_plugin.apps.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n"
            "    pass\nheavy = [m for m in ('torch', 'transformers', 'hnswlib', 'ray', 'llama_index') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"
    if argv == ["--version"]:
        assert done.stdout.startswith(f"fot-memory {__version__}")


def test_every_option_with_a_default_shows_it():
    for command, parser in _subparsers(build_parser()).items():
        text = parser.format_help()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, [], argparse.SUPPRESS) or default is False:
                continue
            assert action.help and "default" in parser._get_formatter()._get_help_string(action), \
                f"`fot-memory {command}` {action.option_strings[0]} hides its default {default!r}"
        assert "%(default)" not in text


def test_one_device_text_everywhere():
    texts = {action.help for parser in _subparsers(build_parser()).values() for action in parser._actions
             if "--device" in action.option_strings}
    assert texts == {"where the model runs: cpu, cuda, cuda:1, mps, ... (default: cpu)"}


@pytest.mark.parametrize("argv", [["forget", "X"], ["docs"], ["info"], ["verify"], ["reindex"], ["repair"],
                                  ["ask", "Who came?"], ["docs", "--json"]])
def test_read_only_and_removing_commands_never_create_a_store(tmp_path, capsys, argv):
    store = tmp_path / "mistyped" / "store"
    assert main([*argv, "--store", str(store)]) == 2
    error = capsys.readouterr().err
    assert f"No memory store at {store}" in error and "nothing was created" in error and "fot-memory read" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "message"), [(b"", "is empty"), (b"  \n\t\n", "is empty"),
                                                  (b"a\x00b", "looks binary"), (b"\xff\xfe\xfa", "not valid UTF-8")])
def test_read_checks_its_input_before_the_model_loads(tmp_path, capsys, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    assert main(["read", str(path), "--store", str(tmp_path / "store"), "--model", NO_MODEL]) == 2
    assert message in capsys.readouterr().err  # the file, not the model: it was checked first
    assert not (tmp_path / "store").exists()


def test_other_inputs_are_checked_before_the_model_loads(tmp_path, capsys):
    assert main(["read", str(tmp_path / "missing.txt"), "--store", str(tmp_path / "s"), "--model", NO_MODEL]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["ask", "  ", "--store", str(tmp_path / "s")]) == 2
    assert "question is empty" in capsys.readouterr().err
    assert main(["eval", "perplexity", str(tmp_path / "held-out.txt"), "--model", NO_MODEL]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "corpus"), "--out", str(tmp_path / "run"), "--model", NO_MODEL]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "run").exists()


def test_an_existing_store_still_answers_docs_json(store_dir, capsys):
    """The refusals above are for missing stores only: a real one lists its documents."""
    assert main(["docs", "--json", "--store", str(store_dir)]) == 0
    assert {doc["name"] for doc in json.loads(capsys.readouterr().out)["documents"]} == {"novel.txt"}


def test_ask_takes_a_question_longer_than_the_local_window(store_dir, capsys):
    question = "It was a truth universally acknowledged, and the neighbours said so again and again. " * 6
    assert main(["ask", question, "--store", str(store_dir), "--no-chat", "--max-new-tokens", "2", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert isinstance(answer["answer"], str) and answer["sources"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, tiny_model_dir) -> Path:
    from fot_memory_plugin.documents.document_memory import STORE_DEFAULTS, DocumentMemory

    store = tmp_path_factory.mktemp("cli") / "store"
    with DocumentMemory.open(store, model=str(tiny_model_dir), config=STORE_DEFAULTS.replace(local_window=32)) as memory:
        memory.read_text("It is a truth universally acknowledged. " * 8, name="novel.txt")
    return store


def test_the_passkey_heatmap_keeps_its_titles_and_labels_apart(tmp_path):
    """`eval passkey --plot`: the suptitle clears the panel titles, only the first panel carries the
    depth label (the panels share it), and no label runs into the neighbouring panel."""
    from fot_memory_plugin.apps.passkey import heatmap_figure, plot_heatmap

    rows = [{"length": length, "depth": depth, "trial": 0, "memory": memory, "correct": memory, "answer": ""}
            for memory in (True, False) for length in (4000, 16000, 64000) for depth in (0.1, 0.5, 0.9)]
    figure = heatmap_figure(rows, "passkey, window 512, mode zero")
    figure.draw_without_rendering()
    renderer = figure.canvas.get_renderer()
    first, second = figure.axes[:2]
    suptitle = figure._suptitle.get_window_extent(renderer)
    for axis in (first, second):
        assert not suptitle.overlaps(axis.title.get_window_extent(renderer))
    assert first.get_ylabel() == "passkey depth" and second.get_ylabel() == ""
    assert first.get_tightbbox(renderer).x1 < second.get_window_extent(renderer).x0
    plot_heatmap(rows, str(tmp_path / "passkey.png"))
    assert (tmp_path / "passkey.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
