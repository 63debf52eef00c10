"""Integrations with other frameworks; each lives in its own folder (`llama_index/`)."""

__all__: list[str] = []
