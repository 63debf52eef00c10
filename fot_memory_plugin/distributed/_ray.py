"""Importing and starting Ray, lazily: `import fot_memory_plugin` never needs it."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from .errors import RayNotInstalledError

__all__ = ["require_ray", "connect", "forwarded_env"]

logger = logging.getLogger(__name__)

# Environment the driver forwards to its tasks and actors: workers on other nodes do not inherit it.
_FORWARDED = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FOT_MEMORY_CACHE", "HF_HOME")
# Ray reads this when imported: "0" makes a local cluster use the loopback address (otherwise it
# advertises the machine's outward one).
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray(what: str = "This") -> Any:
    """The `ray` module, or RayNotInstalledError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError(what) from None
    return ray


def forwarded_env() -> dict[str, str]:
    """The variables of _FORWARDED that are set here."""
    return {name: os.environ[name] for name in _FORWARDED if name in os.environ}


def connect(address: str | None, what: str) -> Any:
    """Ray, connected: to `address` ("auto", "ray://host:10001", "127.0.0.1:6379"), to the cluster this
    process already joined, or (None) to a new local cluster on this machine, on the loopback
    address only when Ray was not imported yet. Returns the module."""
    if address is None and "ray" not in sys.modules and "RAY_ADDRESS" not in os.environ:
        os.environ.setdefault(_LOOPBACK_ENV, "0")
    ray = require_ray(what)
    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {"runtime_env": {"env_vars": forwarded_env()}, "log_to_driver": True}
    if address is None:
        options |= {"include_dashboard": False}
    ray.init(address=address, **options)
    logger.info("connected to Ray: %s", ray.cluster_resources())
    return ray
