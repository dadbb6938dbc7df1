"""Zero-copy reads of packed rows in pinned host memory, by a GPU kernel.

Page-locked memory registered with ``cudaHostRegister`` is mapped into the device's address space
(unified addressing), so a kernel can load the rows a decode step selected straight over PCIe:
no copy of the selection to the host, no host memcpy into staging, no host wait inside the step.
Each program loads one row in whole words (4 bytes where the row allows), a contiguous run.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch


def zero_copy_supported(device: torch.device) -> bool:
    """A CUDA device and Triton to build the gather kernel with."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


@functools.cache
def _gather_kernel() -> Any:
    """The Triton kernel, built on first use (Triton is imported only where it is used)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gather_rows(table, index, out, words, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        source = tl.load(index + row).to(tl.int64)
        columns = tl.arange(0, BLOCK)
        for start in range(0, words, BLOCK):
            mask = start + columns < words
            values = tl.load(table + source * words + start + columns, mask=mask)
            tl.store(out + row.to(tl.int64) * words + start + columns, values, mask=mask)

    return gather_rows


def gather_rows(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = table[index[i]]``, read by the device from pinned host memory.

    Args:
        table: pinned host rows [R, W] of words (int32, int16 or uint8). index: int64 [N] on the device.
        out: [N, W] on the device, same dtype as ``table``.
    """
    n, words = out.shape
    assert table.shape[1] == words and index.shape == (n,) and table.dtype == out.dtype
    block = 1 << max(5, (min(words, 512) - 1).bit_length())  # words per load, a power of two
    _gather_kernel()[(n,)](table, index, out, words, BLOCK=block)
