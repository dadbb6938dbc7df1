"""The disk tier: tensors kept in files, moved with large sequential reads and writes.

A :class:`DiskTensor` is one file holding a ``[L, rows, *item]`` tensor row-major, so a token range
of one layer is one contiguous byte range: reading it is one ``preadv`` straight into a (pinned)
host buffer, which the copy stream then moves to the GPU. There is no page-cache trickery: the OS
may cache what fits, and the policy plans with the measured rates of :func:`measure_disk_bps`.

Disk I/O runs on one background thread (:class:`DiskQueue`), in submission order, so a write
queued for a token range is on disk before any later read of it.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvpr.errors import KvprError


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (writable: reads land in place)."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def check_offload_dir(directory: str | os.PathLike[str], nbytes: int, what: str) -> Path:
    """The disk tier's directory, created if needed; raises if it cannot hold ``nbytes`` more."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KvprError(
            f"--offload-dir {directory}: cannot create it ({err.strerror}); pick a writable directory"
        ) from None
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    if nbytes > free:
        raise KvprError(
            f"{what} needs {nbytes / 2**30:.2f} GiB on disk but {path} has {free / 2**30:.2f} GiB free: "
            "put less on disk (--percent) or use another --offload-dir"
        )
    return path


class DiskTensor:
    """A ``[num_layers, rows, *item]`` tensor of ``dtype`` in one file (created sparse, removed on close)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.row_bytes = torch.empty((), dtype=dtype).element_size()
        for size in shape[2:]:
            self.row_bytes *= size
        self.layer_bytes = self.row_bytes * shape[1]
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.layer_bytes * shape[0])

    def _offset(self, layer: int, start: int, tensor: torch.Tensor) -> int:
        rows = tensor.numel() * tensor.element_size() // self.row_bytes
        if tensor.dtype != self.dtype or not (
            0 <= layer < self.shape[0] and 0 <= start and start + rows <= self.shape[1]
        ):
            raise ValueError(f"{self.path.name}: rows [{start}, {start + rows}) of layer {layer} out of {self.shape}")
        return layer * self.layer_bytes + start * self.row_bytes

    def write(self, layer: int, start: int, rows: torch.Tensor) -> None:
        """Store ``rows`` (a contiguous CPU tensor [t, *item]) at rows [start, start + t) of ``layer``."""
        view, offset = _bytes_view(rows), self._offset(layer, start, rows)
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def read_into(self, layer: int, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` (a contiguous CPU tensor [t, *item]) from rows [start, start + t) of ``layer``."""
        view, offset = _bytes_view(out), self._offset(layer, start, out)
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise OSError(f"{self.path}: unexpected end of file")
            done += got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)

    def __del__(self) -> None:
        self.close()


class DiskQueue:
    """One background thread doing disk work in submission order, keyed so a reader can wait for
    the writes of what it is about to read."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # started by the first write
        self._pending: dict[object, list[concurrent.futures.Future[None]]] = {}

    def submit(self, key: object, work: Callable[[], None]) -> None:
        """Queue ``work`` (a write of ``key``'s data)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpr-disk")
        self._pending.setdefault(key, []).append(self._pool.submit(work))

    def wait(self, key: object) -> None:
        """Block until every queued write of ``key`` is done (re-raising its error)."""
        for future in self._pending.pop(key, []):
            future.result()

    def drain(self) -> None:
        for key in list(self._pending):
            self.wait(key)

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def measure_disk_bps(directory: str | os.PathLike[str], nbytes: int = 256 << 20) -> tuple[float, float]:
    """Sequential (read, write) bytes/s of ``directory``'s disk: write with fsync, drop the file's
    pages from the cache, read back. A quick estimate for the policy, not a storage benchmark."""
    path = check_offload_dir(directory, 2 * nbytes, "measuring the disk") / "kvpr-disk-probe.bin"
    data = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    probe = DiskTensor(path, (1, nbytes), torch.uint8)
    try:
        start = time.perf_counter()
        probe.write(0, 0, data)
        os.fsync(probe._fd)
        write_s = time.perf_counter() - start
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(probe._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        probe.read_into(0, 0, torch.empty_like(data))
        read_s = time.perf_counter() - start
    finally:
        probe.close()
    return nbytes / read_s, nbytes / write_s
