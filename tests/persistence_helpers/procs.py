"""Start and watch worker subprocesses (tests/persistence_helpers/worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent


def start_worker(*args: object) -> subprocess.Popen:
    """Start `python -m persistence_helpers.worker ARGS` with this interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "persistence_helpers.worker", *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_worker(*args: object, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a worker to completion; raise with its stderr if it failed."""
    process = start_worker(*args)
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"worker {args} exited {process.returncode}:\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 30.0) -> None:
    """Wait until path exists; fail early if the process dies first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"worker exited {process.returncode} before {path.name}:\n{process.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.01)
