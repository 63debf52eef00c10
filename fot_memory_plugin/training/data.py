"""Training data: text files as document-aware token streams, tokenized once and cached.

Every file is one document. The corpus keeps all token ids in one array with document
offsets; a batch draws N different documents and, from each, two consecutive windows
(the cross-batch layout of `crossbatch.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

__all__ = ["TokenCorpus", "text_files"]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def text_files(paths: Iterable[str | os.PathLike[str]], hold_out: Sequence[str] = ()) -> list[Path]:
    """The .txt/.md files under `paths` (files or directories), sorted, minus held-out names.

    `hold_out` entries match a file's name or stem, so a whole book stays out of training.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"No training text at {path}: give text files or directories that hold them.")
    held = set(hold_out)
    unknown = held - {p.name for p in found} - {p.stem for p in found}
    if unknown:
        raise ValueError(f"--hold-out {sorted(unknown)} matches no training file: give file names or stems.")
    kept = [p for p in found if p.name not in held and p.stem not in held]
    if not kept:
        raise ValueError("No training files left after holding some out: give more text.")
    return kept


@dataclass
class TokenCorpus:
    """Token ids of many documents, concatenated, with document boundaries."""

    tokens: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (documents + 1,) int64: document i is tokens[offsets[i]:offsets[i + 1]]
    names: list[str]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def from_files(cls, files: Sequence[Path], tokenizer: Any, cache_dir: Path | None = None) -> TokenCorpus:
        """Tokenize `files` (UTF-8 text), or load the cached result for the same files and tokenizer."""
        key = _cache_key(files, tokenizer)
        cached = cache_dir / f"tokens-{key}.npz" if cache_dir is not None else None
        if cached is not None and cached.is_file():
            logger.info("token cache hit: %s", cached)
            return cls.load(cached)
        ids = [tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False).input_ids for path in files]
        corpus = cls(
            tokens=np.concatenate([np.asarray(doc, dtype=np.int32) for doc in ids]),
            offsets=np.concatenate([[0], np.cumsum([len(doc) for doc in ids])]).astype(np.int64),
            names=[path.name for path in files],
        )
        if cached is not None:
            corpus.save(cached)
        return corpus

    def save(self, path: Path) -> None:
        """Write atomically: a temporary file renamed into place."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(temporary, tokens=self.tokens, offsets=self.offsets, names=json.dumps(self.names))
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: Path) -> TokenCorpus:
        with np.load(path) as data:
            return cls(tokens=data["tokens"], offsets=data["offsets"], names=json.loads(str(data["names"])))

    def sample_windows(self, num_docs: int, window: int, generator: torch.Generator, copy_probability: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous, current) windows, each (num_docs, window), from num_docs different documents.

        Documents are drawn without replacement with probability proportional to how many
        window pairs they hold, so every pair of the corpus is about equally likely.
        `copy_probability`: share of documents whose current window gets a passage of their
        previous window pasted in (see `_paste_recall`).
        """
        pairs = np.maximum(self.lengths - 2 * window + 1, 0).astype(np.float64)
        usable = int((pairs > 0).sum())
        if usable < num_docs:
            raise ValueError(
                f"Only {usable} documents hold two windows of {window} tokens; a batch needs {num_docs} "
                "different documents: add text, or lower --batch-docs or --window."
            )
        weights = torch.from_numpy(pairs)
        docs = torch.multinomial(weights, num_docs, replacement=False, generator=generator).tolist()
        starts = [int(self.offsets[doc]) + int(torch.randint(int(pairs[doc]), (1,), generator=generator)) for doc in docs]
        spans = np.stack([self.tokens[start : start + 2 * window] for start in starts])
        spans = torch.from_numpy(spans.astype(np.int64))  # (N, 2W)
        previous, current = spans[:, :window], spans[:, window:].clone()
        for doc in range(num_docs):
            if copy_probability and torch.rand((), generator=generator) < copy_probability:
                _paste_recall(previous[doc], current[doc], generator)
        return previous, current


def _paste_recall(previous: torch.Tensor, current: torch.Tensor, generator: torch.Generator) -> None:
    """Paste a passage (8 to W/4 tokens) of the previous window somewhere into the current one.

    Natural text repeats names and phrases at a distance, but rarely within two windows; the
    pasted passage makes recall from memory pay off in every batch, so the memory layers learn
    to find and copy what they saw (the skill a passkey or a question about the text needs),
    while the negatives of the other documents keep the keys distinguishable.
    """
    window = previous.shape[0]
    length = int(torch.randint(8, max(9, window // 4), (1,), generator=generator))
    source = int(torch.randint(0, window - length + 1, (1,), generator=generator))
    target = int(torch.randint(0, window - length + 1, (1,), generator=generator))
    current[target : target + length] = previous[source : source + length]


def _cache_key(files: Sequence[Path], tokenizer: Any) -> str:
    digest = hashlib.sha256(f"format {_CACHE_FORMAT}\n".encode())
    digest.update(_tokenizer_identity(tokenizer).encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def _tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer's full definition when it has one (the same wherever the model was loaded from)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps([type(tokenizer).__name__, len(tokenizer)])
