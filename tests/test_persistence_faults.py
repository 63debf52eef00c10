"""Fault injection with real processes and real file systems: writers killed at 20 random points,
a disk that fills up, a read-only store, a truncated database. After each fault every earlier
document answers identically (exact and hnswlib search) and the store opens."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from persistence_helpers import synth
from persistence_helpers.checks import assert_consistent, assert_unchanged, snapshot
from persistence_helpers.procs import TESTS_DIR, start_worker

from fot_memory_plugin.persistence import (
    MemoryStore,
    StoreDatabaseError,
    StoreDiskFullError,
    StorePermissionError,
    repair_store,
)

logger = logging.getLogger(__name__)
KILL_TRIALS = 20


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store with "keep" (1000 tokens, searched exactly) and "big" (9000, through hnswlib)."""
    path = tmp_path_factory.mktemp("faults") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "keep", 5, 1000)
        synth.write_document(store, "big", 6, 9000)
        baseline = snapshot(store, ["keep", "big"])
    return path, baseline


def _check_survived(path: Path, baseline) -> bool:
    """The store opens as a writer, is consistent, earlier documents are unchanged, a write works.
    Returns whether the victim was stored."""
    assert_consistent(path)
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        assert_unchanged(store, baseline)
        names = {record.name for record in store.documents()}
        if "victim" in names:
            assert store.document("victim").num_tokens == 3000
        synth.write_document(store, "after", 8, 300, force=True)
    assert_consistent(path)
    return "victim" in names


def test_kill_9_at_20_random_points_of_a_read(template, tmp_path):
    """Each writer reads a 3000-token document (12 windows, 30 ms apart, then the commit) and is
    SIGKILLed at a random time between its start and a little after its expected end, so kills
    land in the first windows, between the first window and the commit, and in the commit."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    outcomes = []
    for batch in range(KILL_TRIALS // 5):  # five writers at a time on two cores
        pending = []
        for number in range(5):
            path = Path(shutil.copytree(template[0], tmp_path / f"store{batch}-{number}"))
            marker = tmp_path / f"marker{batch}-{number}"
            worker = start_worker("write", path, "victim", 9, 3000, "--sleep", "0.03", "--marker", marker)
            pending.append((path, marker, worker, rng.uniform(0.0, 1.2)))
        started: dict[Path, float] = {}
        while pending:
            for item in list(pending):
                path, marker, worker, delay = item
                if marker not in started:
                    if marker.exists():
                        started[marker] = time.monotonic()
                    elif worker.poll() is not None:
                        raise AssertionError(f"worker exited {worker.returncode}: {worker.stderr.read()}")
                elif time.monotonic() >= started[marker] + delay:
                    finished = worker.poll() is not None
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=30)
                    worker.stdout.close()
                    worker.stderr.close()
                    pending.remove(item)
                    try:
                        stored = _check_survived(path, template[1])
                    except AssertionError as error:
                        raise AssertionError(f"random seed {seed}, delay {delay:.3f}: {error}") from error
                    outcomes.append((delay, finished, stored))
            time.sleep(0.005)
    stored = sum(1 for _, _, s in outcomes if s)
    logger.info("kill -9 (seed %d): %d/%d trials survived; victim stored in %d, absent in %d",
                seed, len(outcomes), KILL_TRIALS, stored, len(outcomes) - stored)
    assert len(outcomes) == KILL_TRIALS


# -- disk full ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_file_system(folder: Path, megabytes: int):
    """A tmpfs of this size mounted at `folder` (root only); skips the test where it cannot be made."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the RLIMIT_FSIZE test covers this")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_full_mid_write_removes_the_partial_write_and_keeps_the_rest(template, tmp_path):
    template_mb = sum(p.stat().st_size for p in template[0].rglob("*") if p.is_file()) // 1_000_000
    with _small_file_system(tmp_path / "small", template_mb + 4) as small:
        path = Path(shutil.copytree(template[0], small / "store"))
        with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
            with pytest.raises(StoreDiskFullError, match=r"needs about .* MB, .* MB are free.*unchanged") as caught:
                synth.write_document(store, "victim", 9, 30000)  # ~1.8 MB of .kv per layer, plus graphs
            assert caught.value.needed_bytes > caught.value.free_bytes
            assert list((path / "tmp").iterdir()) == []
            with pytest.raises(StoreDiskFullError, match="Free some space"):
                store.require_space(100 << 20)
        assert _check_survived(path, template[1]) is False


def _write_with_file_size_limit(path: Path, limit: int, tokens: int, graph_degree: int) -> subprocess.CompletedProcess:
    """A writer subprocess whose files may not grow beyond `limit` bytes (RLIMIT_FSIZE: EFBIG)."""
    code = ("import sys; from persistence_helpers import synth\n"
            "from fot_memory_plugin.persistence import IndexParams, MemoryStore, StoreDiskFullError\n"
            "with MemoryStore.open(sys.argv[1], fingerprint=synth.fingerprint()) as store:\n"
            "    try:\n"
            "        synth.write_document(store, 'victim', 9, int(sys.argv[2]), index_params=IndexParams(kind=\"hnsw\", M=int(sys.argv[3])))\n"
            "    except StoreDiskFullError as error:\n"
            "        print(error); sys.exit(3)\n")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, str(path), str(tokens), str(graph_degree)],
                          capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


# A .kv file outgrows the limit while the document is read (Python sees EFBIG); or, with a graph
# degree that makes each hnswlib file larger than a .kv file, a graph outgrows it at commit,
# where hnswlib's C++ stream reports nothing and only the file's size tells.
@pytest.mark.parametrize("where, limit, tokens, degree, says", [
    ("kv", 200_000, 30000, 16, "file-size limit"),
    ("graph", 1_800_000, 2000, 96, "bytes were written"),
])
def test_file_size_limit_mid_write_is_a_disk_full_error(template, tmp_path, where, limit, tokens, degree, says):
    path = Path(shutil.copytree(template[0], tmp_path / "store"))
    result = _write_with_file_size_limit(path, limit, tokens, degree)
    assert result.returncode == 3, result.stderr
    assert says in result.stdout and "Not enough disk space" in result.stdout, result.stdout
    assert _check_survived(path, template[1]) is False


# -- a read-only store ---------------------------------------------------------------------------


@contextlib.contextmanager
def _read_only_view(source: Path, view: Path):
    """`source` seen read-only at `view`: a read-only bind mount as root, else permissions."""
    view.mkdir()
    if os.geteuid() == 0:
        bound = subprocess.run(["mount", "--bind", str(source), str(view)], capture_output=True)
        if bound.returncode != 0:
            pytest.skip("cannot bind-mount here")
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True, capture_output=True)
            yield view
        finally:
            subprocess.run(["umount", "-l", str(view)], check=False)
    else:
        view.rmdir()
        os.symlink(source, view)
        for folder, _, files in os.walk(source):
            for name in [*files, "."]:
                target = Path(folder) / name
                os.chmod(target, target.stat().st_mode & ~0o222)
        try:
            yield view
        finally:
            for folder, _, files in os.walk(source):
                for name in [*files, "."]:
                    os.chmod(Path(folder) / name, 0o700 if name == "." else 0o600)


def test_read_only_store_searches_and_refuses_writes_cleanly(template, tmp_path):
    path = Path(shutil.copytree(template[0], tmp_path / "store"))
    with _read_only_view(path, tmp_path / "view") as view:
        with MemoryStore.open(view, readonly=True) as store:
            assert_unchanged(store, template[1])
        for writer_call in (lambda: MemoryStore.open(view, fingerprint=synth.fingerprint(), hold_lock=True),
                            lambda: synth.write_document(MemoryStore.open(view, fingerprint=synth.fingerprint()),
                                                         "victim", 9, 100)):
            with pytest.raises(StorePermissionError, match="Permission denied"):
                writer_call()
    assert _check_survived(path, template[1]) is False


# -- a truncated database ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.7])
def test_truncated_database_is_refused_and_repaired_from_manifests(template, tmp_path, keep):
    path = Path(shutil.copytree(template[0], tmp_path / "store"))
    database = path / "memory.sqlite"
    with open(database, "r+b") as handle:
        handle.truncate(int(database.stat().st_size * keep))
    for open_store in (lambda: MemoryStore.open(path, readonly=True),
                       lambda: MemoryStore.open(path, fingerprint=synth.fingerprint())):
        with pytest.raises(StoreDatabaseError, match="repair"):
            with open_store() as store:
                store.documents()
    report = repair_store(path)
    assert sorted(report.restored) == ["big", "keep"], report
    assert _check_survived(path, template[1]) is False
