"""Fused GPU decode of a KIVI block: unpack, dequantise, inverse Hadamard and cast in one kernel.

One program decodes ``BLOCK_ROWS`` rows (a row: one token of one sequence and head, ``d`` values).
A code of ``b`` bits sits at bits ``[b*c, b*c + b)`` of its row's little-endian bit stream for every
width ``kvpr.compress.packing`` writes (the 3-bit words included), so the kernel loads the byte
holding the first bit and the next one and shifts. Keys take their scale and zero per channel of
their token group, values per group of channels of their token. A rotated part is multiplied by
the normalized Hadamard matrix in float32 (``tl.dot`` without TF32), the torch oracle's
butterflies in another summation order. Triton is imported on first use only, so CPU-only
installs never import it (``KiviCodec.decode`` falls back to ``decode_reference`` there).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any

import torch

from kvpr.cache.codec import EncodedKV
from kvpr.compress.packing import packed_len
from kvpr.compress.rotation import hadamard_matrix

if TYPE_CHECKING:
    from kvpr.compress.kivi import KiviCodec

BLOCK_ROWS = 32  # rows per program (tl.dot needs at least 16)


def triton_available() -> bool:
    """Triton is installed and a CUDA device exists (the kernel's only target)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def _dequant_kernel() -> Any:
    """The Triton kernel, built on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_rows(
        codes,  # uint8 [rows, packed]
        scale,  # fp16: per channel [rows / (heads * T), heads, D], or per group [rows, D / GROUP]
        zero,
        rotation,  # float32 [D, D] (read only when ROTATE)
        out,  # [rows, D] in the output dtype
        num_rows,
        heads,  # b * n_kv: rows per token
        token_group,
        packed,  # bytes per row
        D: tl.constexpr,
        BITS: tl.constexpr,
        PER_CHANNEL: tl.constexpr,
        GROUP: tl.constexpr,
        ROTATE: tl.constexpr,
        BLOCK_ROWS: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [R]
        cols = tl.arange(0, D)  # [D]
        live = (rows < num_rows)[:, None]  # [R, 1]
        first_bit = cols * BITS
        byte = first_bit >> 3  # [D]
        at = rows[:, None] * packed + byte[None, :]  # [R, D]
        low = tl.load(codes + at, mask=live, other=0).to(tl.int32)
        high = tl.load(codes + at + 1, mask=live & (byte + 1 < packed)[None, :], other=0).to(tl.int32)
        code = ((low | (high << 8)) >> (first_bit & 7)[None, :]) & ((1 << BITS) - 1)  # [R, D]
        if PER_CHANNEL:
            token = rows // heads
            meta = ((token // token_group) * heads + rows % heads)[:, None] * D + cols[None, :]
        else:
            meta = rows[:, None] * (D // GROUP) + (cols // GROUP)[None, :]
        step = tl.load(scale + meta, mask=live, other=0).to(tl.float32)
        base = tl.load(zero + meta, mask=live, other=0).to(tl.float32)
        x = code.to(tl.float32) * step + base  # [R, D]
        if ROTATE:
            h = tl.load(rotation + cols[:, None] * D + cols[None, :])  # [D, D]
            x = tl.dot(x, h, input_precision="ieee")
        tl.store(out + rows[:, None] * D + cols[None, :], x.to(out.dtype.element_ty), mask=live)

    return dequant_rows


@functools.cache
def _rotation(d: int, device: torch.device) -> torch.Tensor:
    """The float32 Hadamard matrix of ``d`` on ``device``, made once per (d, device)."""
    return hadamard_matrix(d, device=device)


def _decode_part(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    residual: torch.Tensor,
    codec: KiviCodec,
    d: int,
    dtype: torch.dtype,
    per_channel: bool,
    rotate: bool,
) -> torch.Tensor:
    """One part (K or V): [full, b, n_kv, packed] codes and their metadata -> [t, b, n_kv, d]."""
    full, b, n_kv = codes.shape[:3]
    out = torch.empty(full + residual.shape[0], b, n_kv, d, dtype=dtype, device=codes.device)  # [t, b, n_kv, d]
    num_rows = full * b * n_kv
    if num_rows:
        rotation = _rotation(d, codes.device) if rotate else scale  # any pointer when unused
        grid = (-(-num_rows // BLOCK_ROWS),)
        _dequant_kernel()[grid](
            codes.contiguous(), scale.contiguous(), zero.contiguous(), rotation, out,
            num_rows, b * n_kv, codec.token_group, packed_len(d, codec.bits),
            D=d, BITS=codec.bits, PER_CHANNEL=per_channel, GROUP=codec.group_size, ROTATE=rotate,
            BLOCK_ROWS=BLOCK_ROWS,
        )  # fmt: skip
    out[full:] = residual
    return out


def decode_fused(codec: KiviCodec, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``codec.decode`` on CUDA: K and V [t, b, n_kv, d] in ``dtype``, each by one kernel launch.

    ``d`` must be a power of two of at least 16 (the kernel's register tile; every head_dim kvpr
    runs); other shapes take the torch path.
    """
    d = enc.shape[3]
    if d < 16 or d & (d - 1):
        return codec.decode_reference(enc, dtype)
    ts = enc.tensors
    k = _decode_part(
        ts["k_codes"], ts["k_scale"], ts["k_zero"], ts["k_residual"], codec, d, dtype, True, codec.rotates_k
    )
    v = _decode_part(
        ts["v_codes"], ts["v_scale"], ts["v_zero"], ts["v_residual"], codec, d, dtype, False, codec.rotates_v
    )
    return k, v
