"""Packed byte rows on one tier: how a compressed cache moves only the chunks a decode step selects.

A block codec's parts for one (chunk, sequence, head) are packed side by side into one uint8 row
(:class:`RowLayout`), so a selected chunk is one contiguous copy. :class:`RowTier` holds the rows
token-major, ``[capacity, b, n_kv, row_bytes]`` (a finalised block of chunks is one contiguous
write-back), on the compute device or in (pinned) host memory. Reading some rows from pinned host memory on
a CUDA device is one gather kernel that loads them over PCIe (``kvpr.cache.zero_copy``); otherwise
an index-select into a pinned staging buffer followed by one asynchronous host-to-device copy. On a
CPU-only machine the staging path runs with plain memory copies, so the offloaded path is tested in CI.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from kvpr.cache.zero_copy import gather_rows, zero_copy_supported
from kvpr.device import host_empty


@dataclass(frozen=True)
class RowPart:
    """One named part of a row: its per-row shape, dtype and byte range."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


class RowLayout:
    """Where each named part sits in a packed row (wider dtypes first, so every view is aligned).

    Args:
        parts: (name, per-row shape, dtype) of every part; the row is padded to the widest
            element size so the rows of a ``[..., row_bytes]`` tensor stay aligned for it.
    """

    def __init__(self, parts: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        ordered = sorted(parts, key=lambda part: -_itemsize(part[2]))  # stable: fp16 first
        placed, offset = [], 0
        for name, shape, dtype in ordered:
            nbytes = _itemsize(dtype) * _numel(shape)
            placed.append(RowPart(name, tuple(shape), dtype, offset, nbytes))
            offset += nbytes
        widest = max((_itemsize(dtype) for _, _, dtype in parts), default=1)
        self.parts = tuple(placed)
        self.payload_bytes = offset  # bytes that carry data
        self.row_bytes = -(-offset // widest) * widest  # payload plus alignment padding

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], names: Sequence[str], lead: int) -> RowLayout:
        """The layout of ``names`` read off example tensors whose first ``lead`` dims index rows."""
        return cls([(name, tuple(tensors[name].shape[lead:]), tensors[name].dtype) for name in names])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(part.name for part in self.parts)

    def pack(self, tensors: Mapping[str, torch.Tensor], lead: int) -> torch.Tensor:
        """Tensors ``[*L, *shape]`` (``L`` = the first ``lead`` dims, equal for all) -> uint8 [*L, row_bytes]."""
        first = tensors[self.parts[0].name]
        dims = tuple(first.shape[:lead])
        pieces = []
        for part in self.parts:
            x = tensors[part.name]
            assert tuple(x.shape) == dims + part.shape and x.dtype == part.dtype, (part, tuple(x.shape), x.dtype)
            pieces.append(x.reshape(*dims, -1).view(torch.uint8))  # [*L, nbytes]
        padding = self.row_bytes - self.payload_bytes
        if padding:
            pieces.append(torch.zeros(*dims, padding, dtype=torch.uint8, device=first.device))
        return torch.cat(pieces, dim=-1)

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 rows [*L, row_bytes] -> views [*L, *shape] of every part (no copy)."""
        assert rows.dtype == torch.uint8 and rows.shape[-1] == self.row_bytes and rows.stride(-1) == 1
        dims = tuple(rows.shape[:-1])
        out = {}
        for part in self.parts:
            piece = rows[..., part.offset : part.offset + part.nbytes].view(part.dtype)  # [*L, numel]
            out[part.name] = piece.reshape(*dims, *part.shape) if part.shape else piece.reshape(dims)
        return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


_WORDS = ((torch.int32, 4), (torch.int16, 2), (torch.uint8, 1))


class GatherStaging:
    """Pinned host buffers that selected rows are gathered into before one copy to the device.

    One buffer per name (e.g. K rows and V rows), grown on demand and shared by every layer: a
    layer's gather starts only after the host has read the layer's selection from the device, a
    synchronising copy that is queued behind the previous layer's host-to-device copy, so that
    copy has finished reading the buffer by then.
    """

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, num_rows: int, row_bytes: int) -> torch.Tensor:
        """uint8 [num_rows, row_bytes], contiguous, reused across calls."""
        need = num_rows * row_bytes
        held = self._buffers.get(name)
        if held is None or held.numel() < need:
            held = host_empty((need,), torch.uint8, self.pin)
            self._buffers[name] = held
        return held[:need].view(num_rows, row_bytes)

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() for buffer in self._buffers.values())


class RowTier:
    """Packed rows ``[capacity, b, n_kv, row_bytes]`` on the compute device or in host memory.

    Args:
        capacity: rows along the first (token-major) axis: chunks, groups or blocks.
        lead: (b, n_kv).
        row_bytes: from the :class:`RowLayout`.
        device: the compute device (where rows are read to).
        on_host: keep the rows in host memory (pinned when ``pin``), else on ``device``.
        staging: where host rows are gathered before the copy (shared by all layers).
        name: this tier's staging buffer.
    Rows ``[0, length)`` are filled, by :meth:`write` only.
    """

    def __init__(
        self,
        capacity: int,
        lead: tuple[int, int],
        row_bytes: int,
        device: torch.device,
        on_host: bool,
        pin: bool,
        staging: GatherStaging | None,
        name: str,
    ) -> None:
        shape = (capacity, *lead, row_bytes)
        self.device, self.on_host, self.pin, self.name = device, on_host, pin and on_host, name
        self.rows = (
            host_empty(shape, torch.uint8, self.pin)
            if on_host
            else torch.empty(shape, dtype=torch.uint8, device=device)
        )
        self.staging = staging
        self.length = 0
        self.zero_copy = self.pin and zero_copy_supported(device)  # the device reads selected rows in place
        # the widest word that divides a row: every load of the kernel is a whole word
        self.word = next(dtype for dtype, size in _WORDS if row_bytes % size == 0)

    @property
    def row_bytes(self) -> int:
        return self.rows.shape[-1]

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def nbytes(self) -> int:
        """Bytes of the filled rows."""
        return self.length * self.rows[0].numel()

    def host_nbytes(self) -> int:
        """Host memory this tier allocated (every row, filled or not): 0 on the compute device."""
        return self.rows.numel() if self.on_host else 0

    def write(self, rows: torch.Tensor) -> None:
        """Append rows [t, b, n_kv, row_bytes] (on the compute device) at ``length``."""
        start, end = self.length, self.length + rows.shape[0]
        if end > self.capacity:
            raise ValueError(f"row tier {self.name} holds {self.capacity} rows; {end} requested")
        # Device-to-host when offloaded: queued on the current stream, so any later read of these
        # rows (which follows a synchronising copy of the selection) sees them.
        self.rows[start:end].copy_(rows, non_blocking=self.pin)
        self.length = end

    def read(self, start: int, end: int) -> torch.Tensor:
        """Rows [start, end) on the compute device: one contiguous copy from the host, else a view."""
        block = self.rows[start:end]  # [t, b, n_kv, row_bytes]
        return block.to(self.device, non_blocking=self.pin) if self.on_host else block

    def gather(self, index: torch.Tensor, repeat: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Rows at flat indices ``index`` [N] into the ``[capacity * b * n_kv]`` rows.

        A host tier reads with the zero-copy kernel when ``index`` is on the device (no host wait),
        else through staging: ``index`` on the host (the caller moved it there once for all tiers).
        ``repeat`` (on the compute device): the rows to return, as positions in ``index``, so rows
        shared by several readers (V groups of several selected chunks) cross the link once.
        Returns the rows [N or len(repeat), row_bytes] on the compute device and the bytes copied
        from host memory (0 for a device tier).
        """
        flat = self.rows.view(-1, self.row_bytes)
        if not self.on_host:
            rows, link = flat.index_select(0, index.to(self.device)), 0
        else:
            zero_copy = self.zero_copy and index.device.type != "cpu"
            rows = self._zero_copy_gather(flat, index) if zero_copy else None
            if rows is None:
                rows = self._staged_gather(flat, index.cpu())  # a host wait when the index is on the device
            link = rows.numel()
        return (rows if repeat is None else rows.index_select(0, repeat)), link  # [N or len(repeat), row_bytes]

    def _staged_gather(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The rows at ``index`` (host) memcpy'd into pinned staging, then copied to the device."""
        assert self.staging is not None
        staged = self.staging.buffer(self.name, index.numel(), self.row_bytes)
        with record_function(f"{self.name}.host_gather"):
            torch.index_select(flat, 0, index, out=staged)  # host memcpy of the selected rows only
        # Host-to-device of the staged rows; the buffer is reused only after the next selection
        # reached the host, a synchronising copy queued after this one.
        return staged.to(self.device, non_blocking=self.pin)

    def _zero_copy_gather(self, flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The rows at ``index`` (device) read in place by the gather kernel, or None (and the
        staging path from then on, with a warning) where this driver cannot map the memory."""
        out = torch.empty(index.numel(), self.row_bytes, dtype=torch.uint8, device=self.device)
        try:
            with record_function(f"{self.name}.zero_copy_gather"):
                gather_rows(flat.view(self.word), index, out.view(self.word))
        except Exception as err:  # a driver or Triton without mapped host memory: stage instead
            reason = f"{type(err).__name__}: {err}"
            warnings.warn(f"zero-copy gather unavailable ({reason}); staging rows instead", stacklevel=3)
            self.zero_copy = False
            return None
        return out
