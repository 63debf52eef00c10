"""The distributed layer's own failures; each message says what to do."""

from __future__ import annotations

from ..core.errors import FoTMemoryError

__all__ = ["RayNotInstalledError", "ShardCatalogError", "CorpusReadError"]


class RayNotInstalledError(FoTMemoryError, ImportError):
    """Ray is needed (distributed reading, sharded memories) but is not installed."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} runs on Ray, which is not installed. Install the extra: "
            "pip install 'fot-memory-plugin[ray]' (or ./setup.sh, which installs it); everything else "
            "works without it."
        )


class ShardCatalogError(FoTMemoryError, ValueError):
    """A shard catalog that cannot be served: missing, malformed, or shards that disagree."""


class CorpusReadError(FoTMemoryError, RuntimeError):
    """Some documents of a distributed read failed; the others are stored."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = dict(failed)
        listed = "; ".join(f"{name}: {problem}" for name, problem in list(failed.items())[:5])
        more = f" (and {len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} document(s) were not read: {listed}{more}. The documents that finished are "
            "stored; run the same read again to read the missing ones."
        )
