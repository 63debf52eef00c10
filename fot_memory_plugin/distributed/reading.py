"""Reading a corpus on Ray: one task per document, each into its own staging store; the driver
imports every finished document into the target store.

The driver is the target store's only writer (the single-writer rule holds): tasks write only
their staging stores, `<staging_dir>/<key>/`, which the driver imports one at a time through
`MemoryStore.import_document` (temp dir, fsync, rename, row last) and then removes. A task that
fails or is killed loses only its own document, which the next run reads; documents already
stored (same sha256) are skipped without a task. Staging directories must be reachable by the
driver and the task under the same path: any path on one machine, a shared filesystem on a
cluster.

Example:
    report = read_corpus(["a.txt", "b.txt"], "store", model="smollm2-fot", ray_address="auto")
    report.read, report.skipped, report.failed
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.config import MemoryConfig
from ..documents.document_memory import DOCUMENT_MODEL, STORE_DEFAULTS, _as_config_fields, _recorded_fingerprint, load_text
from ..persistence import MemoryStore
from ..persistence.files import remove_tree
from ._ray import connect
from .errors import CorpusReadError

__all__ = ["read_corpus", "CorpusReport", "DocumentTiming"]

logger = logging.getLogger(__name__)

# Called in the task after each stored window with (document name, end token, tokens): fault
# injection in tests, or a hook of one's own. Must be picklable (cloudpickle).
WindowHook = Callable[[str, int, int], None]
_POLL_S = 0.25  # how often the driver refreshes the progress bar while tasks run


@dataclass(frozen=True)
class DocumentTiming:
    """Where one document's time went: the task's read, and the driver's import of it."""

    name: str
    tokens: int
    read_s: float  # in the task: model load excluded, reading and commit to staging included
    import_s: float  # on the driver: copy, checksum, fsync, rename, SQLite row


@dataclass
class CorpusReport:
    """What a distributed read did, per document name."""

    read: list[str] = field(default_factory=list)  # read by a task and imported now
    skipped: list[str] = field(default_factory=list)  # already stored (same text)
    failed: dict[str, str] = field(default_factory=dict)  # name -> what went wrong
    timings: list[DocumentTiming] = field(default_factory=list)
    wall_s: float = 0.0

    def raise_for_failures(self) -> None:
        if self.failed:
            raise CorpusReadError(self.failed)


@dataclass(frozen=True)
class _Job:
    name: str
    text: str
    source_path: str
    staging: str


def read_corpus(
    paths: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    *,
    ray_address: str | None = None,
    model: str | None = None,
    config: MemoryConfig | None = None,
    num_gpus_per_task: float | None = None,
    num_cpus_per_task: float = 1,
    threads_per_task: int | None = None,
    staging_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    retrieve: bool | None = None,
    progress: bool = False,
    max_retries: int = 0,
    after_window: WindowHook | None = None,
) -> CorpusReport:
    """Read text files into `store` with one Ray task per document; returns a CorpusReport.

    model, config: for a new store (an existing one uses what it recorded, as `fot-memory read`).
    num_gpus_per_task: None gives each task one GPU when the cluster has GPUs, else none.
    threads_per_task: torch threads of each task (default: its CPUs, at least 1).
    staging_dir: where tasks write their staging stores (default: `.<store name>.staging`
    beside the store). max_retries: Ray's automatic retries of a task whose worker died (0: the
    document is reported failed and the next run reads it). Failures do not raise: check
    `report.failed` (or call `report.raise_for_failures()`).
    """
    started = time.perf_counter()
    store = Path(store).expanduser().absolute()
    staging_root = Path(staging_dir) if staging_dir is not None else store.parent / f".{store.name}.staging"
    report = CorpusReport()
    model, config = _model_and_config(store, model, config)
    jobs = _jobs(paths, store, staging_root, force, report)
    if jobs:
        ray = connect(ray_address, "Reading a corpus with --ray")
        gpus = num_gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(_read_task).options(num_cpus=num_cpus_per_task, num_gpus=gpus, max_retries=max_retries)
        tracker = ray.remote(_Progress).options(num_cpus=0).remote()
        pending = {task.remote(job.text, job.name, job.source_path, job.staging, model,
                               None if config is None else config.to_dict(),
                               "cuda" if gpus else "cpu", retrieve, threads_per_task or int(max(1, num_cpus_per_task)),
                               tracker,
                               after_window): job for job in jobs}
        _collect(ray, pending, store, tracker, sum(len(job.text) for job in jobs), progress, report)
    _remove_if_empty(staging_root)
    report.wall_s = time.perf_counter() - started
    return report


def _model_and_config(store: Path, model: str | None,
                      config: MemoryConfig | None) -> tuple[str, MemoryConfig | None]:
    """As DocumentMemory.open: an existing store's recorded model and config, else the given ones
    (None: the task's DocumentMemory.open chooses, e.g. a FoT-tuned model's own memory layers)."""
    recorded = _recorded_fingerprint(store)
    if recorded:
        model = model or recorded.get("load_as", "smollm2")  # stores from before load_as was kept
        config = config or STORE_DEFAULTS.replace(**_as_config_fields(recorded["memory_config"]))
    return model or DOCUMENT_MODEL, config


def _jobs(paths: Sequence[str | os.PathLike[str]], store: Path, staging_root: Path, force: bool,
          report: CorpusReport) -> list[_Job]:
    """One job per path whose text the store does not hold yet (all of them with force)."""
    names = [Path(path).name for path in paths]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise ValueError(f"Several paths share the file names {doubled}: documents are named by file name, "
                         "so read them in separate runs or rename them.")
    stored: set[str] = set()
    if (store / "memory.sqlite").exists() and not force:
        with MemoryStore.open(store, readonly=True) as target:
            stored = {record.sha256 for record in target.documents()}
    run = secrets.token_hex(4)
    jobs = []
    for index, path in enumerate(paths):
        text = load_text(path)
        if hashlib.sha256(text.encode("utf-8")).hexdigest() in stored:
            report.skipped.append(Path(path).name)
            continue
        staging = staging_root / f"{run}-{index:05d}"
        jobs.append(_Job(Path(path).name, text, str(Path(path).resolve()), str(staging)))
    return jobs


def _collect(ray: Any, pending: dict, store: Path, tracker: Any, total_chars: int, progress: bool,
             report: CorpusReport) -> None:
    """Import each document as its task finishes; one progress bar over every task's characters."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total_chars, unit="char", desc="reading on Ray", disable=not progress)
    target: MemoryStore | None = None
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            bar.n = min(total_chars, ray.get(tracker.total.remote()))
            bar.refresh()
            for ref in done:
                job = pending.pop(ref)
                target = _finish(ray, ref, job, store, target, report)
        bar.n = total_chars
        bar.refresh()
    finally:
        bar.close()
        if target is not None:
            target.close()
        for ref, job in pending.items():  # only after an interrupt: stop the tasks, drop their staging
            ray.cancel(ref, force=True)
            remove_tree(Path(job.staging))


def _finish(ray: Any, ref: Any, job: _Job, store: Path, target: MemoryStore | None,
            report: CorpusReport) -> MemoryStore | None:
    """Import one finished task's document (or record its failure); returns the open target."""
    try:
        result = ray.get(ref)
        with MemoryStore.open(result["staging"], readonly=True) as staged:
            if target is None:  # opened at the first import: a new store takes the tasks' fingerprint
                target = MemoryStore.open(store, fingerprint=staged.fingerprint)
            begun = time.perf_counter()
            record, _ = target.import_document(staged, result["doc_id"])
            imported_s = time.perf_counter() - begun
        report.read.append(job.name)
        report.timings.append(DocumentTiming(job.name, record.num_tokens, result["read_s"], imported_s))
    except Exception as error:  # noqa: BLE001 (a failed task loses only its own document)
        logger.warning("%s was not read: %s", job.name, error)
        report.failed[job.name] = _short(error)
    finally:
        remove_tree(Path(job.staging))
    return target


def _short(error: BaseException) -> str:
    """The first line of an error (Ray wraps task errors in a long traceback)."""
    cause = getattr(error, "cause", None)
    shown = cause if isinstance(cause, BaseException) else error
    text = str(shown).strip().splitlines()
    return f"{type(shown).__name__}: {text[-1] if text else ''}"[:500]


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


class _Progress:
    """A Ray actor summing the characters every task has read (the driver's one progress bar)."""

    def __init__(self) -> None:
        self._done: dict[str, int] = {}

    def report(self, name: str, chars: int) -> None:
        self._done[name] = chars

    def total(self) -> int:
        return sum(self._done.values())


def _read_task(text: str, name: str, source_path: str, staging: str, model: str, config: dict[str, Any] | None,
               device: str, retrieve: bool | None, threads: int, tracker: Any,
               after_window: WindowHook | None) -> dict[str, Any]:
    """In a Ray worker: read one document into a new staging store; returns where and what it stored."""
    import torch

    from ..documents.document_memory import DocumentMemory

    torch.set_num_threads(threads)
    memory_config = None if config is None else MemoryConfig.from_dict(config)
    with DocumentMemory.open(staging, model=model, config=memory_config, device=device) as memory:
        started = time.perf_counter()

        def on_window(end: int, total: int) -> None:
            tracker.report.remote(name, round(len(text) * end / total))
            if after_window is not None:
                after_window(name, end, total)

        record, _ = memory.read_text(text, name=name, source_path=source_path, retrieve=retrieve,
                                     on_window=on_window)
        read_s = time.perf_counter() - started
    return {"staging": staging, "doc_id": record.id, "tokens": record.num_tokens, "read_s": read_s}
