"""A join's tokens into some rows of the pinned host tier, without blocking the host: pitched
device-to-host copies (one per stored part and run of consecutive rows) on the store stream.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Sequence
from typing import Any

import torch


def row_runs(rows: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive rows in ``rows``: (first row, end row, position of the first in
    ``rows``). Rows 2, 3, 4, 7 give (2, 5, 0), (7, 8, 3)."""
    runs: list[tuple[int, int, int]] = []
    for position, row in enumerate(rows):
        if runs and runs[-1][1] == row:
            first, _, at = runs[-1]
            runs[-1] = (first, row + 1, at)
        else:
            runs.append((row, row + 1, position))
    return runs


def cuda_copy_2d() -> Callable[[torch.Tensor, torch.Tensor], None] | None:
    """``copy(dst, src)``: a device block [t, r, ...] into a pitched host view [t, r, ...] (rows
    ``r`` of a wider pinned tensor), as one ``cudaMemcpy2DAsync`` on the current stream; None where
    libcudart cannot be found. torch's own ``copy_`` into a non-contiguous host tensor goes through
    a pageable temporary and blocks the host."""
    path = None
    with open("/proc/self/maps") as maps:  # the libcudart torch loaded (pip wheels ship their own)
        for line in maps:
            if "libcudart.so" in line:
                path = line.split()[-1]
                break
    path = path or ctypes.util.find_library("cudart")
    if path is None:
        return None
    try:
        memcpy_2d = ctypes.CDLL(path).cudaMemcpy2DAsync
    except (OSError, AttributeError):
        return None
    size = ctypes.c_size_t
    memcpy_2d.argtypes = [ctypes.c_void_p, size, ctypes.c_void_p, size, size, size, ctypes.c_int, ctypes.c_void_p]
    memcpy_2d.restype = ctypes.c_int
    device_to_host = 2  # cudaMemcpyDeviceToHost

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        assert dst.shape == src.shape and dst.dtype == src.dtype and src.is_cuda and not dst.is_cuda
        assert dst[0].is_contiguous() and src[0].is_contiguous(), "each token's rows must be one block"
        element = dst.element_size()
        stream = torch.cuda.current_stream(src.device).cuda_stream
        status = memcpy_2d(
            dst.data_ptr(), dst.stride(0) * element, src.data_ptr(), src.stride(0) * element,
            dst[0].numel() * element, dst.shape[0], device_to_host, stream,
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {status}")

    return copy


class HostRows:
    """Writes a join's tokens into some rows of the pinned host tier without blocking the host:
    on the overlapped executor's store stream, one pitched copy per stored part and contiguous
    run of rows (no CPU index_put, no pageable bounce), ordered like a tail flush by the
    executor's ``flushed`` event of the layer. The sequential executor copies in program order."""

    def __init__(self, executor: Any) -> None:
        self.streams = getattr(executor, "streams", None)
        self.flushed: list[Any] | None = getattr(executor, "flushed", None)
        self.copy_2d = cuda_copy_2d() if executor.device.type == "cuda" else None

    def wait_flush(self, layer: int) -> None:
        """The compute stream waits for the last write-back of ``layer`` (it reads the GPU tail)."""
        if self.streams is not None and self.flushed is not None:
            self.flushed[layer].compute_waits()  # a flushed tail is copied before rows overwrite it

    def store(
        self, storage: Any, layer: int, runs: list[tuple[int, int, int]], start: int, *tokens: torch.Tensor
    ) -> None:
        """Host slots [start, start+t) of the rows in ``runs``: k, v [t, k, n_kv, d], x [t, k, h]
        (X only where the storage keeps it); the storage holds them as computed."""
        k, v, x = tokens
        assert storage.raw and storage.x_codec is None, "rows join only a host tier stored exactly"
        end = start + k.shape[0]
        pairs = [(storage.k(layer), k), (storage.v(layer), v)]
        if storage.store_inputs:
            pairs.append((storage.x(layer), x))
        sources = [(host, part.contiguous()) for host, part in pairs]  # [t, k, ...] on the compute stream
        streams = self.streams
        if streams is None:
            self._copy_runs(sources, runs, start, end)
            return
        with streams.on_store_after_compute():  # after the compute that made them, and every load before
            for _, source in sources:
                streams.keep_alive_for_store(source)
            self._copy_runs(sources, runs, start, end)
            self.flushed[layer].record()  # type: ignore[index]  # loads of these slots wait

    def _copy_runs(
        self, sources: list[tuple[torch.Tensor, torch.Tensor]], runs: list[tuple[int, int, int]], start: int, end: int
    ) -> None:
        for host, source in sources:
            for first, last, at in runs:
                dst, src = host[start:end, first:last], source[:, at : at + last - first]  # [t, r, ...]
                if self.copy_2d is not None and src.is_cuda:
                    self.copy_2d(dst, src)
                else:
                    dst.copy_(src)
