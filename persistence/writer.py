"""DocumentWriter: streams one document's keys and values to disk, then publishes it atomically.

While the document is read, background threads (one by default; more when the model does not
need the CPU) write each appended window to the `.kv` files and, for hnswlib indexes, insert
its keys into the graphs (hnswlib releases the GIL), so disk writes and index building overlap
the model's compute; `append` only converts and queues (a GPU's windows are staged on the
device and queued GPU_STAGE_TOKENS at a time). Nothing searches these indexes while they grow
(reading retrieves from the engine's in-RAM memory). Cluster indexes are computed at commit
(k-means per (layer, KV head)) from the finished `.kv` files, or from the keys a GPU read kept
on the device.

Order of a commit (each step survives a crash of the step after it):
  1. the queue drained; `.kv` files closed and fsynced in tmp/<doc_id>/
  2. indexes finished and saved (hnswlib graphs with their extras, each file's size checked:
     hnswlib does not report a failed write; or cluster indexes), fsynced
  3. the manifest (record and chunks, for `repair`) written and fsynced
  4. docs/<doc_id> recorded as 'write' pending (committed); the temp directory renamed to
     docs/<doc_id>/, then its writer marker removed, docs/ fsynced
  5. ONE SQLite transaction: delete the documents it replaces (now 'delete' pending), insert
     its row and chunks, clear its own pending
  6. replaced documents' directories removed, their pending cleared
A crash before the rename in 4 leaves a tmp/ directory with our writer marker; a crash after it
or before 5 a 'write'-pending directory without a row; a crash before the end of 6 a
'delete'-pending one.
The next writer-side open removes exactly those, because the database says they are ours, and
nothing else. Readers only ever see documents whose row is committed, so only complete documents.
A full disk (or a file-size limit) anywhere raises StoreDiskFullError after the unfinished
write is removed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DuplicateDocumentError, StoreDiskFullError, StoreError
from .faults import as_store_error, free_bytes
from .files import (
    WRITER_MARKER,
    StoreLayout,
    clusters_filename,
    crc32_file,
    extras_filename,
    file_stamp,
    fsync_dir,
    fsync_file,
    index_filename,
    kv_filename,
    remove_tree,
)
from .cluster_index import build_cluster_index
from .hnsw_index import IndexBuilder, IndexParams
from .kvfile import DeviceRows, KVFileWriter, host_rows, kv_file_size, open_kv, to_storage
from .manifest import Manifest, write_manifest
from .metadata import FORMAT_VERSION, DocumentRecord, Metadata

__all__ = ["DocumentWriter", "ChunkSpan", "estimate_document_bytes"]

logger = logging.getLogger(__name__)

# (start_token, end_token, start_char, end_char, text): tokens [start, end) are chars [start, end).
ChunkSpan = tuple[int, int, int, int, str]


def _no_step(step: str) -> None:
    """Default of `after_step`: do nothing."""


# Called with the name of each finished commit step ("kv_written", "files_written", "renamed",
# "committed" (after the lock is released)). Crash tests replace it in a worker process to stop there and be killed.
after_step: Callable[[str], None] = _no_step


# Jobs (a window's `.kv` write, or one head's inserts) waiting for the background threads, all
# together: 64 appends of a 3-KV-head layer on one thread. Bounds RAM; append blocks beyond.
_QUEUED_JOBS = 256


def estimate_document_bytes(num_tokens: int, *, layers: int, kv_heads: int, head_dim: int, dtype: str,
                            M: int = IndexParams().M, kind: str = IndexParams().kind,
                            cluster_size: int = IndexParams().cluster_size) -> int:
    """About how many bytes a document takes on disk: its `.kv` files plus its indexes: hnswlib
    graphs (per key: level-0 links (2M + 1 ints), the key plus one coordinate, its label; upper
    levels add about 1/M of that again) or cluster indexes (a 4-byte token id per key, a float16
    centroid per cluster). Chunks and extras are small beside these."""
    if kind == "clusters":
        index = num_tokens * kv_heads * (4 + 2 * head_dim // cluster_size + 1)
    else:
        per_key = (2 * M + 1) * 4 + (head_dim + 1) * 4 + 8
        index = int(num_tokens * kv_heads * per_key * (1 + 1 / M))
    return layers * (kv_file_size(num_tokens, kv_heads, head_dim, dtype) + index)


_SPACES = {  # recorded with each document: how its index ranks keys
    "hnsw": "l2 over centred keys + sqrt(B^2 - |k - mu|^2); beyond B exact; duplicates collapsed; "
            "window starts exact",
    "clusters": "k-means (L2) clusters of centred keys ranked by inner product with their centroids, "
                "exact inner product inside the chosen clusters; window starts exact",
}


# A document read on a GPU is staged there per layer and goes to the host this many tokens at a
# time (kvfile.DeviceRows): one copy and one writer job per 16 windows of 512, not per window.
GPU_STAGE_TOKENS = 8192
# For a cluster index its keys also stay on the device until the commit's k-means, which then
# does not read them back from the files, within this many bytes (and a quarter of the device's
# free memory at the first append); past that a layer's index reads its file, as on a CPU.
GPU_KEPT_KEYS_BYTES = 2 << 30


class _Background:
    """One thread running queued jobs in order. The first error stops it and is raised by the
    next `submit` or by `join`."""

    def __init__(self, queued: int = _QUEUED_JOBS) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=queued)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._run, name="fot-memory-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None and not self._cancelled:
                try:
                    job()
                except BaseException as error:  # noqa: BLE001 (handed to the writer's thread)
                    self._error = error

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        self._raise()
        self._jobs.put(job)

    def join(self) -> None:
        """Wait until every queued job ran (the thread then ends); raise the first error."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._raise()

    def cancel(self) -> None:
        """Skip the queued jobs and end the thread."""
        self._cancelled = True
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


class _Lanes:
    """Background threads sharing jobs by key: a key's jobs (here one (layer, KV head) index, and
    the layer's `.kv` file with head 0) always run on the same thread, in order, so each file
    and index grows in token order; different keys are independent, so with more threads the
    hnswlib inserts run side by side (hnswlib releases the GIL). The first error of any thread
    is raised by the next `submit` or by `join`."""

    def __init__(self, threads: int) -> None:
        self._lanes = [_Background(max(8, _QUEUED_JOBS // threads)) for _ in range(threads)]
        self._lane_of: dict[Hashable, _Background] = {}

    def _raise(self) -> None:
        for lane in self._lanes:
            lane._raise()

    def submit(self, key: Hashable, job: Callable[[], None]) -> None:
        self._raise()
        lane = self._lane_of.setdefault(key, self._lanes[len(self._lane_of) % len(self._lanes)])
        lane.submit(job)

    def join(self) -> None:
        errors = []
        for lane in self._lanes:
            try:
                lane.join()
            except BaseException as error:  # noqa: BLE001 (every thread must end first)
                errors.append(error)
        if errors:
            raise errors[0]

    def cancel(self) -> None:
        for lane in self._lanes:
            lane.cancel()


def _staged(keys: np.ndarray | torch.Tensor) -> bool:
    """Whether a window is staged where it lies (DeviceRows) rather than converted at once: a GPU's."""
    return isinstance(keys, torch.Tensor) and keys.is_cuda


def _spare_device_bytes(device: torch.device) -> int:
    """How many bytes of kept keys a device can spare: a quarter of what is free on a GPU."""
    if device.type != "cuda":
        return GPU_KEPT_KEYS_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return min(GPU_KEPT_KEYS_BYTES, free // 4)


def _two_level(kmeans: str, device: str | None) -> bool:
    """IndexParams.kmeans for a commit's k-means on this device (None: the CPU)."""
    return kmeans == "two-level" or (kmeans == "auto" and torch.device(device or "cpu").type == "cpu")


def _as_array(name: str, array: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if not isinstance(array, (np.ndarray, torch.Tensor)):
        raise TypeError(f"append takes {name} as a numpy array or torch tensor, got {type(array).__name__}.")
    if array.ndim != 3:
        raise ValueError(f"append takes {name} of shape (Hkv, T, D) for one layer; got shape {tuple(array.shape)}.")
    return array


def _check_chunk(chunk: Sequence[Any]) -> ChunkSpan:
    if len(chunk) != 5:
        raise ValueError(f"a chunk is (start_token, end_token, start_char, end_char, text); got {chunk!r}.")
    start_token, end_token, start_char, end_char, text = chunk
    spans = (start_token, end_token, start_char, end_char)
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in spans):
        raise ValueError(f"chunk spans must be ints >= 0; got {spans}.")
    if start_token >= end_token or start_char > end_char:
        raise ValueError(f"chunk spans must have start < end tokens and start <= end chars; got {spans}.")
    if not isinstance(text, str):
        raise ValueError(f"chunk text must be a str, got {type(text).__name__}.")
    return int(start_token), int(end_token), int(start_char), int(end_char), text


class DocumentWriter:
    """Write one document (made by `MemoryStore.begin_document`; use it as a context manager).

    Holds the store's writer lock from creation until commit or abort. Nothing becomes visible
    to readers until the `with` block exits cleanly; an exception discards everything written.
    """

    def __init__(
        self,
        layout: StoreLayout,
        meta: Metadata,
        release_lock: Callable[[], None],
        *,
        name: str,
        source_path: str | None,
        sha256: str,
        text_length: int,
        metadata: dict[str, Any],
        dtype: str,
        index_params: IndexParams,
        fingerprint: dict[str, Any],
        force: bool,
        threads: int = 1,
        expected_bytes: int | None = None,
        index_device: str | None = None,
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an int >= 1, got {threads!r}.")
        self._fingerprint, self._expected_bytes = fingerprint, expected_bytes
        self._index_device = index_device or "cpu"
        self._layout, self._meta, self._release_lock = layout, meta, release_lock
        self.name, self.source_path, self.sha256 = name, source_path, sha256
        self.text_length, self.metadata, self.dtype = text_length, metadata, dtype
        self.index_params, self.force = index_params, force
        self._expect_layers = fingerprint.get("mem_layers")
        self._kv_heads: int | None = fingerprint.get("num_kv_heads")
        self._head_dim: int | None = fingerprint.get("head_dim")
        self._files: dict[int, KVFileWriter] = {}
        self._builders: dict[int, list[IndexBuilder]] = {}  # per layer, one per KV head (hnswlib)
        self._window_starts: dict[int, list[int]] = {}  # per layer: first token of each append
        self._counts: dict[int, int] = {}  # tokens appended per layer (queued ones included)
        self._device_rows: dict[int, DeviceRows] = {}  # per layer, a GPU read's rows not yet queued
        self._device_keys: dict[int, list[torch.Tensor]] = {}  # per layer, its keys kept on the GPU
        self._device_keys_room = 0  # bytes more kept keys may take (set at the first GPU append)
        self._chunks: list[ChunkSpan] = []
        self._state = "open"  # -> "committed" | "aborted"
        self.record: DocumentRecord | None = None
        self.commit_seconds: dict[str, float] = {}  # set by commit
        self._tmp = layout.new_temp_dir()
        self.doc_id = self._tmp.name  # the directory's name in tmp/ and, once published, in docs/
        self._pending_added = False
        self._background = _Lanes(threads)

    def __enter__(self) -> DocumentWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.commit()

    @property
    def num_tokens(self) -> int:
        """Tokens appended so far (to the layer that has the fewest)."""
        return min(self._counts.values(), default=0)

    def append(self, layer: int, keys: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor) -> None:
        """Append one reading window of one memory layer: keys and values (Hkv, T, D), pre-RoPE keys.

        Call once per layer per window, windows in token order; all layers must end equally long.
        A full disk met by the background writer raises StoreDiskFullError here (or at commit),
        with the unfinished document removed.
        """
        self._require_open()
        try:
            self._append(layer, keys, values)
        except OSError as error:
            self._fail(error)

    def _append(self, layer: int, keys: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor) -> None:
        keys, values = _as_array("keys", keys), _as_array("values", values)
        if tuple(keys.shape) != tuple(values.shape):
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} differ in shape.")
        layer = self._check_layer(layer)
        kv_heads, length, head_dim = (int(n) for n in keys.shape)
        expected = (self._kv_heads, self._head_dim)  # from the fingerprint or the first append
        if any(want is not None and want != got for want, got in zip(expected, (kv_heads, head_dim))):
            raise ValueError(
                f"append got (Hkv, D) = ({kv_heads}, {head_dim}) but this store holds ({self._kv_heads}, "
                f"{self._head_dim}): keys must come from the model the store was opened for."
            )
        self._kv_heads, self._head_dim = kv_heads, head_dim
        if length == 0:
            return
        if layer not in self._files:
            path = self._tmp / kv_filename(layer)
            self._files[layer] = KVFileWriter(path, kv_heads, head_dim, self.dtype)
            self._layout.restrict(path)
            if self.index_params.kind == "hnsw":
                self._builders[layer] = [IndexBuilder(head_dim, self.index_params) for _ in range(kv_heads)]
            self._window_starts[layer] = []
            self._counts[layer] = 0
        self._window_starts[layer].append(self._counts[layer])
        self._counts[layer] += length
        if _staged(keys):
            self._append_from_gpu(layer, keys, values)
            return
        if layer in self._device_rows:  # a GPU read's rows go first; its kept keys miss these
            self._flush_device_rows(layer)
            self._drop_device_keys(layer)
        file, builders = self._files[layer], self._builders.get(layer, [])
        # Converted here (a private copy: the caller may reuse its tensors), written and indexed
        # by the background thread.
        stored_keys, stored_values = (np.array(to_storage(array, self.dtype)) for array in (keys, values))
        # The file goes with the first head's index (a cheap write: lanes balance by indexes).
        self._background.submit((layer, 0), lambda: file.append(stored_keys, stored_values))
        for head, builder in enumerate(builders):
            self._background.submit((layer, head), lambda builder=builder, keys=stored_keys[head]: builder.add(keys))

    def _append_from_gpu(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The same without waiting for the GPU: the rows are staged on the device (DeviceRows)
        and, every GPU_STAGE_TOKENS, queued for a copy to pinned memory that the background thread
        waits for, so the reading loop never stalls on a copy."""
        stage = self._device_rows.get(layer)
        if stage is None:
            if not self._device_rows and self.index_params.kind == "clusters":
                self._device_keys_room = _spare_device_bytes(keys.device)
            kv_heads, _, head_dim = keys.shape
            stage = self._device_rows[layer] = DeviceRows(keys.device, kv_heads, head_dim, self.dtype,
                                                          GPU_STAGE_TOKENS)
            if self.index_params.kind == "clusters":
                self._device_keys[layer] = []
        done, length = 0, keys.shape[1]
        while done < length:
            take = min(stage.room, length - done)
            stage.add(keys[:, done : done + take], values[:, done : done + take])
            done += take
            if not stage.room:
                self._flush_device_rows(layer)

    def _flush_device_rows(self, layer: int) -> None:
        """Queue a layer's staged rows: their copy to the host, the file write and index inserts."""
        stage = self._device_rows[layer]
        if not stage.used:
            return
        if layer in self._device_keys and stage.used_key_bytes > self._device_keys_room:
            self._drop_device_keys(layer)  # over the budget: this layer's index reads its file
        kept = self._device_keys.get(layer)
        host, ready, keys = stage.flush(keep_keys=kept is not None)
        if kept is not None:
            kept.append(keys)
            self._device_keys_room -= keys.nbytes
        file, builders = self._files[layer], self._builders.get(layer, [])

        def write() -> None:
            ready.synchronize()
            file.append_rows(host_rows(host, self.dtype))

        self._background.submit((layer, 0), write)
        for head, builder in enumerate(builders):
            def insert(builder=builder, head=head) -> None:
                ready.synchronize()
                builder.add(np.ascontiguousarray(host_rows(host, self.dtype)[:, 0, head]))
            self._background.submit((layer, head), insert)

    def _drop_device_keys(self, layer: int) -> None:
        self._device_keys_room += sum(part.nbytes for part in self._device_keys.pop(layer, ()))

    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"layer must be a layer index >= 0, got {layer!r}.")
        if self._expect_layers is not None and int(layer) not in self._expect_layers:
            raise ValueError(f"layer {layer} is not a memory layer of this store (mem_layers {self._expect_layers}).")
        return int(layer)

    def add_chunks(self, chunks: Iterable[Sequence[Any]]) -> None:
        """Record text chunks (start_token, end_token, start_char, end_char, text) for citations.

        Chunks may come in any number of calls; together they must not overlap in tokens.
        """
        self._require_open()
        self._chunks.extend(_check_chunk(chunk) for chunk in chunks)

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"This document writer is {self._state}; start a new one with begin_document.")

    def _checked_layout(self) -> tuple[int, list[ChunkSpan]]:
        """Validate what was appended; returns (token count, chunks sorted by start token)."""
        counts = dict(self._counts)
        if not counts:
            raise ValueError(f"Document {self.name!r} has no tokens: append keys and values before finishing it.")
        if len(set(counts.values())) != 1:
            raise ValueError(f"Layers hold different token counts {counts}: append every window to every layer.")
        if self._expect_layers is not None and sorted(counts) != sorted(self._expect_layers):
            missing = sorted(set(self._expect_layers) - set(counts))
            raise ValueError(f"No keys were appended for memory layers {missing}: append every memory layer.")
        num_tokens = next(iter(counts.values()))
        chunks = sorted(self._chunks)
        for before, after in zip(chunks, chunks[1:]):
            if after[0] < before[1]:
                raise ValueError(f"chunks {before[:4]} and {after[:4]} overlap in tokens: chunks must not overlap.")
        if chunks and chunks[-1][1] > num_tokens:
            raise ValueError(f"chunk {chunks[-1][:4]} ends after the document's {num_tokens} tokens.")
        return num_tokens, chunks

    def commit(self) -> DocumentRecord:
        """Finish indexes, write and publish the document (see the module docstring). Returns its record."""
        self._require_open()
        try:
            num_tokens, chunks = self._checked_layout()
            started = time.perf_counter()
            for layer in self._device_rows:
                self._flush_device_rows(layer)
            self._background.join()
            drained = time.perf_counter()
            files = self._finish_kv_files()
            after_step("kv_written")
            written = time.perf_counter()
            summary = self._save_indexes(files)
            after_step("files_written")
            indexed = time.perf_counter()
            record = self._make_record(num_tokens, files, summary)
            replaced = self._publish(record, chunks)
            # Where a commit's time goes (benchmarks/reading_overhead.py prints it).
            self.commit_seconds = {"queue": drained - started, "kv_files": written - drained,
                                   "indexes": indexed - written, "publish": time.perf_counter() - indexed}
        except OSError as error:
            self._fail(error)
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        self.record = record
        self._release_lock()
        for old in replaced:
            remove_tree(self._layout.doc_dir(old))
            if not self._layout.doc_dir(old).exists():
                self._meta.clear_pending(old)
        after_step("committed")
        logger.info("stored document %r (%s): %d tokens, %d layers in %.1f s", record.name, record.id,
                    num_tokens, len(record.layers), time.perf_counter() - started)
        return record

    def _fail(self, error: OSError) -> None:
        """Abort, then raise the store's named error for an OS failure (disk full, permission)."""
        self.abort()
        converted = as_store_error(error, self._layout.root, "write a document into", self._needed_bytes())
        if converted is None:
            raise error
        raise converted from error

    def _needed_bytes(self) -> int:
        """The caller's estimate of the whole document, else one from what was appended so far."""
        if self._expected_bytes:
            return self._expected_bytes
        return estimate_document_bytes(self.num_tokens, layers=len(self._files) or 1, kv_heads=self._kv_heads or 1,
                                       head_dim=self._head_dim or 1, dtype=self.dtype, M=self.index_params.M,
                                       kind=self.index_params.kind, cluster_size=self.index_params.cluster_size)

    def _finish_kv_files(self) -> dict[str, dict[str, Any]]:
        files: dict[str, dict[str, Any]] = {}
        for layer, writer in sorted(self._files.items()):
            size, crc = writer.finish()
            fsync_file(writer.path)
            files[writer.path.name] = {"size": size, "crc32": crc, "stamp": file_stamp(writer.path)}
        return files

    def _save_indexes(self, files: dict[str, dict[str, Any]]) -> dict[str, dict[str, list]]:
        """Finish, save and fsync each (layer, KV head) index and its extras; returns per layer
        the norm bounds, exact-list sizes and collapsed duplicates (for the record)."""
        if self.index_params.kind == "clusters":
            return self._save_cluster_indexes(files)
        summary: dict[str, dict[str, list]] = {}
        for layer in sorted(self._builders):
            builders = self._builders.pop(layer)  # each graph is freed once saved
            summary[str(layer)] = {"norm_bounds": [], "exact_keys": [], "duplicates": []}
            for head, builder in enumerate(builders):
                index, extras = builder.finish()
                paths = (self._tmp / index_filename(layer, head), self._tmp / extras_filename(layer, head))
                index.save_index(str(paths[0]))
                self._check_saved(paths[0], index.index_file_size())
                extras.save(paths[1])
                del index, builder
                for path in paths:
                    self._layout.restrict(path)
                    fsync_file(path)
                    files[path.name] = {"size": path.stat().st_size, "crc32": crc32_file(path)}
                summary[str(layer)]["norm_bounds"].append(round(extras.bound, 4))
                summary[str(layer)]["exact_keys"].append(len(extras.exact_ids))
                summary[str(layer)]["duplicates"].append(len(extras.dup_ids))
        return summary

    def _save_cluster_indexes(self, files: dict[str, dict[str, Any]]) -> dict[str, dict[str, list]]:
        """Compute, save and fsync each layer's cluster index from its finished `.kv` file."""
        params, summary = self.index_params, {}
        for layer, writer in sorted(self._files.items()):
            kv = open_kv(writer.path, writer.num_tokens, writer.kv_heads, writer.head_dim, self.dtype)
            kept = self._device_keys.pop(layer, None)
            keys = torch.cat(kept) if kept and sum(map(len, kept)) == writer.num_tokens else None
            cluster_size = max(params.cluster_size, -(-writer.num_tokens // params.max_clusters))
            index = build_cluster_index(kv, self.dtype, np.asarray(self._window_starts[layer]),
                                        cluster_size=cluster_size, iterations=params.kmeans_iterations,
                                        sample=params.kmeans_sample, seed=params.seed, device=self._index_device,
                                        two_level=_two_level(params.kmeans, self._index_device), keys=keys)
            del kv, kept, keys
            path = self._tmp / clusters_filename(layer)
            index.save(path)
            self._layout.restrict(path)
            fsync_file(path)
            files[path.name] = {"size": path.stat().st_size, "crc32": crc32_file(path), "stamp": file_stamp(path)}
            summary[str(layer)] = {"clusters": [index.num_clusters], "window_starts": [len(index.starts)]}
        return summary

    def _check_saved(self, path: Path, expected_size: int) -> None:
        """hnswlib writes through a C++ stream that ignores write errors: a short file means the
        disk filled up (or a file-size limit was hit)."""
        size = path.stat().st_size
        if size != expected_size:
            raise StoreDiskFullError(str(self._layout.root), self._needed_bytes(), free_bytes(self._layout.root),
                                     f" ({path.name}: {size} of {expected_size} bytes were written)")

    def _make_record(
        self, num_tokens: int, files: dict[str, dict[str, Any]], summary: dict[str, dict[str, list]]
    ) -> DocumentRecord:
        assert self._kv_heads is not None and self._head_dim is not None
        return DocumentRecord(
            id=self.doc_id, name=self.name, source_path=self.source_path, sha256=self.sha256,
            num_tokens=num_tokens, created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            metadata=self.metadata, text_length=self.text_length, dtype=self.dtype,
            kv_heads=self._kv_heads, head_dim=self._head_dim, layers=tuple(sorted(self._files)),
            index_params={**self.index_params.to_dict(), "space": _SPACES[self.index_params.kind],
                          "layers": summary},
            files=files,
        )

    def _publish(self, record: DocumentRecord, chunks: list[ChunkSpan]) -> list[str]:
        """Write the manifest, rename the directory into docs/ and commit the row; returns ids
        of replaced documents."""
        existing = [old.id for old in self._meta.find("name", self.name)]
        if existing and not self.force:
            raise DuplicateDocumentError(self.name, existing[0])
        write_manifest(self._layout, self._tmp, Manifest(record, chunks, self._fingerprint, FORMAT_VERSION))
        fsync_dir(self._tmp)
        self._meta.add_pending(record.id, "write")
        self._pending_added = True
        after_step("manifest_written")
        final = self._layout.doc_dir(record.id)
        # The writer marker stays until the rename: a crash before it leaves tmp/ debris that the
        # next writer can prove is ours; after it, the pending entry has the directory removed.
        os.rename(self._tmp, final)
        self._tmp = final  # abort() now removes the published directory
        (final / WRITER_MARKER).unlink()
        fsync_dir(final)
        fsync_dir(self._layout.docs)
        after_step("renamed")
        self._meta.insert_document(record, chunks, replace_ids=existing)
        return existing

    def abort(self) -> None:
        """Discard everything written (idempotent); releases the writer lock."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._background.cancel()
        self._builders.clear()
        self._device_rows.clear()
        self._device_keys.clear()
        for writer in self._files.values():
            writer.abort()
        remove_tree(self._tmp)
        if self._pending_added and not self._tmp.exists():
            try:
                self._meta.clear_pending(self.doc_id)
            except StoreError:  # the next writer-side open clears it
                logger.warning("could not clear the pending entry of %s", self.doc_id)
        self._release_lock()
        logger.info("discarded unfinished document %r", self.name)
