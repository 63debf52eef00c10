"""The `.kv` file of one (document, memory layer): raw rows, memory-mapped for reading.

Format: no header; a C-contiguous array of shape (N, 2, Hkv, W) where N is the document's
token count, axis 1 is (key, value) and W the row width: the head dimension D, or D + 2 for
int8. Row n holds token n, so the file is written append-only while a document is read, window
by window. The element type is the document's `dtype`: "float16" (the default), "float32",
"bfloat16" (stored as the upper 16 bits of a float32 in uint16), or "int8": each (token, key or
value, KV head) vector quantized to int8 by its own scale, max |x| / 127, whose float16 bits
follow it in 2 more bytes (half the size of float16; rows_float32 dequantizes). N, Hkv, D and
dtype live in the document's SQLite row, and the exact file size is checked before use, so a
truncated file is caught without reading it.
"""

from __future__ import annotations

import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "STORAGE_DTYPES",
    "KVFileWriter",
    "to_storage",
    "DeviceRows",
    "host_rows",
    "open_kv",
    "kv_file_size",
    "rows_float32",
    "rows_tensor",
    "stored_float",
    "quantize_int8",
    "row_width",
]

# Name -> numpy element type on disk (bfloat16 has no numpy type: its bits are stored as uint16).
STORAGE_DTYPES: dict[str, type] = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16,
                                   "int8": np.int8}
_INT8_SCALE = 2  # bytes after each int8 vector: its scale as float16 bits
_FLOAT16_MAX = 65504.0


def _check_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"Unknown memory dtype {dtype!r}: use one of {sorted(STORAGE_DTYPES)}.")


def row_width(dtype: str, head_dim: int) -> int:
    """Stored elements per (token, key or value, KV head) vector: D, or D + 2 for int8 (the scale)."""
    _check_dtype(dtype)
    return head_dim + _INT8_SCALE if dtype == "int8" else head_dim


def quantize_int8(vectors: torch.Tensor) -> torch.Tensor:
    """Float vectors (..., D) on any device -> (..., D + 2) int8: round(x / s), then the float16
    bits of s, the float16 at or just above max |x| / 127 (so |x - dequantized| <= s / 2). A zero
    vector keeps s = 0."""
    vectors = vectors.float()
    wanted = vectors.abs().amax(-1, keepdim=True).div_(127).clamp_(max=_FLOAT16_MAX)
    scale = wanted.to(torch.float16)
    scale = torch.where(scale.float() < wanted, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    divisor = scale.float().masked_fill_(scale == 0, 1.0)
    quantized = torch.round(vectors / divisor).clamp_(-127, 127).to(torch.int8)
    return torch.cat([quantized, scale.view(torch.int8)], dim=-1)


def stored_float(stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored elements as a tensor of their stored type (rows_tensor's, on any device) -> float32
    vectors (..., D): int8 is dequantized by its scale."""
    if dtype == "int8":
        scale = stored[..., -_INT8_SCALE:].contiguous().view(torch.float16).float()  # (..., 1)
        return stored[..., :-_INT8_SCALE].float() * scale
    return stored.float()


def to_storage(array: np.ndarray | torch.Tensor, dtype: str) -> np.ndarray:
    """Convert keys or values (any float numpy array or torch tensor, (..., D)) to the on-disk
    element type: (..., row_width(dtype, D))."""
    _check_dtype(dtype)
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
    else:
        tensor = None
    if dtype == "int8":
        return quantize_int8(tensor if tensor is not None else torch.from_numpy(np.asarray(array, np.float32))).numpy()
    if dtype == "bfloat16":
        if tensor is None:
            tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    target = STORAGE_DTYPES[dtype]
    if tensor is not None:
        return tensor.to(torch.float16 if dtype == "float16" else torch.float32).numpy()
    return np.asarray(array, dtype=target)


_TORCH_STORAGE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}


class DeviceRows:
    """File rows of one layer read on a CUDA device, gathered there before they go to the host.

    `add` writes a window's keys and values (Hkv, T, D) into a device buffer as rows (T, 2,
    Hkv, D) in the storage element type: two copy kernels, queued after whatever computed them.
    `flush` queues one copy of the buffered rows to pinned host memory and returns it with an
    event that says when it is there (the buffer is reused at once: later copies into it run
    after this one on the same stream). One copy and one writer job per `capacity` tokens, not
    per window, is what keeps the reading loop's kernel launches from waiting for the GIL.
    """

    def __init__(self, device: torch.device | str, kv_heads: int, head_dim: int, dtype: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity is a token count >= 1, got {capacity!r}.")
        self.dtype = dtype
        self._rows = torch.empty((capacity, 2, kv_heads, row_width(dtype, head_dim)), dtype=_TORCH_STORAGE[dtype],
                                 device=device)
        self.used = 0

    @property
    def room(self) -> int:
        return len(self._rows) - self.used

    @property
    def used_key_bytes(self) -> int:
        """Bytes of the buffered keys (what flush(keep_keys=True) copies on the device)."""
        return self.used * self._rows[0, 0].nbytes

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Buffer keys and values (Hkv, T, D), T <= room."""
        length = keys.shape[1]
        if length > self.room:
            raise ValueError(f"{length} rows do not fit the {self.room} left: flush first.")
        part = self._rows[self.used : self.used + length]
        for slot, vectors in enumerate((keys, values)):
            vectors = vectors.detach().transpose(0, 1)  # (T, Hkv, D)
            part[:, slot].copy_(quantize_int8(vectors) if self.dtype == "int8" else vectors)
        self.used += length

    def flush(self, keep_keys: bool = False) -> tuple[torch.Tensor, torch.cuda.Event | _Copied, torch.Tensor | None]:
        """(pinned host rows, their event, keep_keys: a device copy of their keys (T, Hkv, W), for
        an index built where the model runs without reading the file back, else None); empties
        the buffer."""
        rows = self._rows[: self.used]
        kept = rows[:, 0].clone() if keep_keys else None
        if self.dtype == "bfloat16":
            rows = rows.view(torch.int16)  # its bits, read back as uint16 (STORAGE_DTYPES)
        self.used = 0
        if not rows.is_cuda:  # (a CPU buffer: what the tests run where there is no GPU)
            return rows.clone(), _COPIED, kept
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(rows.device))  # the stream the copy was queued on
        return host, ready, kept


class _Copied:
    """The event of a copy that was done when it was made."""

    def synchronize(self) -> None:
        pass


_COPIED = _Copied()


def host_rows(host: torch.Tensor, dtype: str) -> np.ndarray:
    """DeviceRows.flush's host tensor (once its event is done) as the numpy rows the file holds."""
    array = host.numpy()
    return array.view(np.uint16) if dtype == "bfloat16" else array


def kv_file_size(num_tokens: int, kv_heads: int, head_dim: int, dtype: str) -> int:
    """Exact size in bytes of a `.kv` file."""
    return num_tokens * 2 * kv_heads * row_width(dtype, head_dim) * np.dtype(STORAGE_DTYPES[dtype]).itemsize


# A writer flushes its file to disk every this many bytes, on the thread that appends (the
# store's background writer): a GPU reads 64k tokens (250 MB of .kv files) in ~3 s, and without
# this the commit's fsync waited for all of it to reach the disk.
SYNC_EVERY_BYTES = 8 << 20


class KVFileWriter:
    """Appends (key, value) rows of one layer to a new file, keeping a running CRC-32.

    sync_every: bytes appended between flushes to disk (fdatasync, which releases the GIL;
    default SYNC_EVERY_BYTES); 0 leaves it all to the caller's fsync after `finish`."""

    def __init__(self, path: Path, kv_heads: int, head_dim: int, dtype: str, *,
                 sync_every: int | None = None) -> None:
        _check_dtype(dtype)
        sync_every = SYNC_EVERY_BYTES if sync_every is None else sync_every
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 0:
            raise ValueError(f"sync_every is a byte count >= 0, got {sync_every!r}.")
        self.path = path
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self._width = row_width(dtype, head_dim)
        self.dtype = dtype
        self.num_tokens = 0
        self._crc = 0
        self._size = 0
        self._sync_every, self._synced = sync_every, 0
        self._handle = open(path, "wb")  # noqa: SIM115 (closed in finish/abort)

    def append(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Append keys and values (Hkv, T, W), already in the storage element type (to_storage)."""
        rows = np.stack([keys, values], axis=0)  # (2, Hkv, T, D)
        self.append_rows(rows.transpose(2, 0, 1, 3))  # (T, 2, Hkv, D): row = token

    def append_rows(self, rows: np.ndarray) -> None:
        """Append file rows (T, 2, Hkv, W) in the storage element type."""
        if rows.shape[1:] != (2, self.kv_heads, self._width):
            raise ValueError(f"rows of shape {rows.shape} do not fit (T, 2, {self.kv_heads}, {self._width}).")
        rows = np.ascontiguousarray(rows)
        data = memoryview(rows).cast("B")  # writing and the CRC release the GIL
        self._handle.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self._size += len(data)
        self.num_tokens += rows.shape[0]
        if self._sync_every and self._size - self._synced >= self._sync_every:
            self._handle.flush()
            os.fdatasync(self._handle.fileno())
            self._synced = self._size

    def finish(self) -> tuple[int, str]:
        """Close the file; returns (size in bytes, CRC-32 hex). The caller fsyncs it."""
        self._handle.close()
        return self._size, f"{self._crc:08x}"

    def abort(self) -> None:
        self._handle.close()


def open_kv(path: Path, num_tokens: int, kv_heads: int, head_dim: int, dtype: str) -> np.ndarray:
    """Memory-map a `.kv` file read-only as (N, 2, Hkv, W) in its storage element type."""
    return np.memmap(path, dtype=STORAGE_DTYPES[dtype], mode="r",
                     shape=(num_tokens, 2, kv_heads, row_width(dtype, head_dim)))


def rows_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored elements (any shape, e.g. a slice of a memory map) as a new tensor of the stored
    type (float16, float32, bfloat16 or int8), not converted: to move to a device and convert
    there (stored_float)."""
    _check_dtype(dtype)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.array(array, order="C")  # a private copy: torch.from_numpy needs writable memory
    if dtype == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def rows_float32(array: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored elements (..., W), e.g. a slice of a memory map, as a new float32 tensor (..., D).

    Converts with torch, which is ~20x faster than numpy for float16 -> float32 here.
    """
    return stored_float(rows_tensor(array, dtype), dtype)
