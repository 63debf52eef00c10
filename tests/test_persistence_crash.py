"""Crash safety and concurrency with real processes: a writer killed with SIGKILL at any point
leaves every document complete or absent; readers beside a writer see only complete documents;
a second writer is refused at once."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import logging

import pytest
from persistence_helpers import synth
from persistence_helpers.checks import assert_consistent, assert_unchanged, snapshot
from persistence_helpers.procs import start_worker, wait_for

from fot_memory_plugin.persistence import MemoryStore, StoreLockedError

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A store holding one finished document, "keep" (seed 5, 1000 tokens)."""
    path = tmp_path_factory.mktemp("template") / "store"
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        synth.write_document(store, "keep", 5, 1000)
        baseline = snapshot(store, ["keep"])
    return path, baseline


def _copy(template, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(template[0], tmp_path / name))


def _kill(process) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    process.stderr.close()


def _check_after_crash(path: Path, template, victim: str, finished: bool | None) -> bool:
    """Everything consistent; "keep" unchanged; the victim complete or absent; a new write works.
    Returns whether the victim was stored."""
    assert_consistent(path)
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
        assert_unchanged(store, template[1])
        names = [record.name for record in store.documents()]
        assert finished is None or (victim in names) == finished, (victim, names)
        if victim in names:
            assert store.document(victim).num_tokens == 2000
        synth.write_document(store, "after", 8, 300, force=True)
    assert_consistent(path)
    return victim in names


@pytest.mark.parametrize("step", ["kv_written", "files_written", "manifest_written", "renamed", "committed"])
def test_kill_at_each_commit_step(template, tmp_path, step):
    path = _copy(template, tmp_path, "store")
    marker = tmp_path / "marker"
    worker = start_worker("write", path, "victim", 6, 2000, "--pause-at", step, "--marker", marker)
    try:
        wait_for(marker.with_suffix(".paused"), worker)
        if step != "committed":  # the paused writer still holds the lock
            started = time.monotonic()
            with MemoryStore.open(path, fingerprint=synth.fingerprint()) as store:
                with pytest.raises(StoreLockedError, match="Another process is writing"):
                    store.begin_document("second", sha256="x", text_length=1)
            assert time.monotonic() - started < 3.0
    finally:
        _kill(worker)
    _check_after_crash(path, template, "victim", finished=step == "committed")


def test_kill_at_random_points(template, tmp_path):
    """Three writers, each killed at a random time after it began its document (appends, index
    build, rename or commit); which state each reached is random, the invariants are not."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    pending = []
    for number in range(3):
        path = _copy(template, tmp_path, f"store{number}")
        marker = tmp_path / f"marker{number}"
        process = start_worker("write", path, "victim", 6, 2000, "--sleep", "0.05", "--marker", marker)
        pending.append((path, marker, process, rng.uniform(0.0, 2.0)))
    killed, started = [], {}
    while pending:
        for item in list(pending):
            path, marker, process, delay = item
            if marker not in started:
                if marker.exists():
                    started[marker] = time.monotonic()
                elif process.poll() is not None:
                    raise AssertionError(f"worker exited {process.returncode}: {process.stderr.read()}")
            elif time.monotonic() >= started[marker] + delay:
                _kill(process)
                killed.append(path)
                pending.remove(item)
        time.sleep(0.005)
    for path in killed:
        try:
            stored = _check_after_crash(path, template, "victim", finished=None)
            logger.info("random kill (seed %d): victim %s", seed, "stored" if stored else "absent")
        except AssertionError as error:
            raise AssertionError(f"random seed {seed}: {error}") from error


def test_readers_beside_a_writer_see_only_complete_documents(template, tmp_path):
    path = tmp_path / "store"
    MemoryStore.open(path, fingerprint=synth.fingerprint()).close()
    stop = tmp_path / "stop"
    readers = [start_worker("poll", path, tmp_path / f"ready{i}", stop, tmp_path / f"report{i}.json")
               for i in range(2)]
    for i, reader in enumerate(readers):
        wait_for(tmp_path / f"ready{i}", reader)
    writer = start_worker("write", path, "doc", 40, 1500, "--sleep", "0.1", "--count", "3")
    _, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    stop.touch()
    for i, reader in enumerate(readers):
        _, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        report = json.loads((tmp_path / f"report{i}.json").read_text())
        assert report["errors"] == []
        assert report["counts_seen"][0] == 0 and report["counts_seen"][-1] == 3, report
    assert_consistent(path)


def test_second_writer_in_same_process_is_refused_then_lock_is_released(template, tmp_path):
    path = _copy(template, tmp_path, "store")
    with MemoryStore.open(path, fingerprint=synth.fingerprint()) as first, \
            MemoryStore.open(path, fingerprint=synth.fingerprint(), lock_timeout=0.2) as second:
        with first.begin_document("one", sha256="1", text_length=1) as writer:
            started = time.monotonic()
            with pytest.raises(StoreLockedError, match="Wait for that read to finish"):
                second.begin_document("two", sha256="2", text_length=1)
            with pytest.raises(StoreLockedError):
                second.forget("keep")
            assert time.monotonic() - started < 1.0
            keys, values = synth.doc_arrays(1, 10, 0)
            for layer in synth.LAYERS:
                writer.append(layer, keys, values)
        synth.write_document(second, "two", 3, 100)
        assert [r.name for r in second.documents()] == ["keep", "one", "two"]
