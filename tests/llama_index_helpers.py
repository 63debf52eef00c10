"""Fixtures for the llama-index tests: a tiny random Llama with SmolLM2's real tokenizer (so chat
templates and text offsets are real), two real documents read by llama-index's own reader into
a real store. Import the fixtures into a test module with `from llama_index_helpers import *`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import BOOK, QUESTION
from fot_memory_plugin import MemoryConfig

__all__ = ["CONFIG", "QUESTION", "BOOK", "library", "store_dir", "fresh_store", "read_library"]

ROOT = Path(__file__).resolve().parents[1]
PERSUASION = ROOT.parent / "shared" / "data" / "books" / "persuasion.txt"
CONFIG = MemoryConfig(local_window=64, top_k=8, mem_dtype="float16", retrieval="exact")


@pytest.fixture(scope="session")
def library(tmp_path_factory) -> Path:
    """A directory of two short real documents, as a user would point SimpleDirectoryReader at."""
    directory = tmp_path_factory.mktemp("library")
    (directory / "chapter1.txt").write_text(BOOK.read_text(encoding="utf-8")[:1500], encoding="utf-8")
    persuasion = PERSUASION.read_text(encoding="utf-8") if PERSUASION.exists() else BOOK.read_text(encoding="utf-8")[5000:]
    (directory / "persuasion.txt").write_text(persuasion[:1200], encoding="utf-8")
    return directory


def read_library(library: Path, store: Path, model_dir: Path):
    """Read the library into a store with llama-index's reader; returns (index, documents)."""
    from llama_index.core import SimpleDirectoryReader

    from fot_memory_plugin.integrations.llama_index.index import FoTMemoryIndex

    documents = SimpleDirectoryReader(input_dir=str(library), filename_as_id=True).load_data()
    return FoTMemoryIndex.from_documents(documents, store, model=str(model_dir), config=CONFIG), documents


@pytest.fixture(scope="session")
def store_dir(tmp_path_factory, library, tiny_model_dir) -> Path:
    """The library read once into a store (tests that change a store copy it: `fresh_store`)."""
    store = tmp_path_factory.mktemp("li-store") / "store"
    index, _ = read_library(library, store, tiny_model_dir)
    index.close()
    return store


@pytest.fixture
def fresh_store(store_dir, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(store_dir, copy, ignore=shutil.ignore_patterns("store.lock"))
    return copy
