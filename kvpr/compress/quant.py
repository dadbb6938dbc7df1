"""Asymmetric min/max quantisation with fp16 scale and zero point, and the int8/int4 codecs.

Scale and zero are rounded to fp16 *outward* (zero down, scale up) so the fp16 grid still covers
the group's range: every element then decodes within half a step of its value, which is the
bound the tests check against a float64 reference.
"""

from __future__ import annotations

import torch

from kvpr.cache.codec import EncodedKV, check_codec, check_kv
from kvpr.compress.packing import pack_bits, packed_len, unpack_bits
from kvpr.errors import KvprError

# fp16 has an 11-bit significand: nudging by 2**-10 before rounding makes rounding go outward.
_OUTWARD = 2.0**-10


def fit_range(x: torch.Tensor, dim: int | tuple[int, ...], levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of an asymmetric grid of ``levels + 1`` points covering ``x`` along ``dim``.

    Args:
        x: float tensor; reduced along ``dim`` (kept as size-1 dims).
        levels: number of steps, ``2**bits - 1``.
    Returns:
        (scale, zero), fp16, with ``zero <= min(x)`` and ``zero + levels * scale >= max(x)``.
    """
    x = x.float()
    if isinstance(dim, int):
        lo, hi = torch.aminmax(x, dim=dim, keepdim=True)  # one pass
    else:
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    zero = (lo - lo.abs() * _OUTWARD).to(torch.float16)
    # Multiply by the reciprocal: CUDA divides by a scalar that way, so CPU and GPU agree bitwise.
    step = (hi - zero.float()) * (1.0 / levels)
    scale = (step * (1 + _OUTWARD)).to(torch.float16)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes ``round((x - zero) / scale)`` clamped to ``[0, levels]``, as uint8 (broadcasting)."""
    step = scale.float()
    step = torch.where(step > 0, step, torch.ones_like(step))  # a constant group: every code 0
    codes = x.float().sub(zero.float())  # one new tensor, then in place where the shapes allow
    codes = codes.div_(step) if torch.broadcast_shapes(codes.shape, step.shape) == codes.shape else codes / step
    return codes.round_().clamp_(0, levels).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes * scale + zero`` in float32 (broadcasting)."""
    return codes.float() * scale.float() + zero.float()


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric quantisation in groups of ``group`` along the last dim, packed.

    Args:
        x: [..., d] with ``d % group == 0``.
    Returns:
        codes uint8 [..., d * bits / 8], scale and zero fp16 [..., d / group].
    """
    d = x.shape[-1]
    if group <= 0 or d % group:
        raise KvprError(
            f"head_dim {d} is not a multiple of the quantisation group {group}; choose a group that divides head_dim"
        )
    levels = (1 << bits) - 1
    xg = x.reshape(*x.shape[:-1], d // group, group)  # [..., d/G, G]
    scale, zero = fit_range(xg, -1, levels)  # [..., d/G, 1]
    codes = quantize(xg, scale, zero, levels).reshape(x.shape)  # [..., d]
    return pack_bits(codes, bits), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_groups(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: float32 [..., d], or [..., d] in ``dtype``.

    A decode right before a GEMM or attention asks for the model dtype. In fp16 the codes widen
    once into the output and scale in place, so the pass moves fp16 bytes, not three float32
    tensors (fp16 holds a code times a scale to within an ulp of the rounded float32 result;
    bfloat16's 8-bit mantissa would not, so it is computed in float32 and cast).
    """
    groups = scale.shape[-1]
    codes = unpack_bits(packed, bits, d).reshape(*packed.shape[:-1], groups, d // groups)
    if dtype in (torch.float16, torch.float32):
        out = codes.to(dtype).mul_(scale.unsqueeze(-1)).add_(zero.unsqueeze(-1))  # [..., groups, G]
        return out.reshape(*packed.shape[:-1], d)
    out = dequantize(codes, scale.unsqueeze(-1), zero.unsqueeze(-1)).reshape(*packed.shape[:-1], d)
    return out if dtype is None else out.to(dtype)


def group_bytes(d: int, bits: int, group: int) -> int:
    """Bytes of one row of ``d`` values: packed codes plus an fp16 scale and zero per group."""
    return packed_len(d, bits) + 4 * (d // group)


def _checked_group(bits: int, group_size: int, allowed: tuple[int, ...], what: str) -> tuple[int, int]:
    """``(bits, group_size)`` if ``bits`` is one of ``allowed`` and the group a positive int."""
    if bits not in allowed:
        raise KvprError(f"{what} supports {', '.join(map(str, allowed))} bits, not {bits}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise KvprError(f"group_size must be a positive int, not {group_size!r}")
    return bits, group_size


class GroupQuantCodec:
    """K and V both per token, ``bits`` asymmetric in groups of ``group_size`` channels (int8, int4)."""

    tokenwise = True

    def __init__(self, bits: int, group_size: int = 32) -> None:
        self.bits, self.group_size = _checked_group(bits, group_size, (2, 4, 8), "group quantisation of K,V")
        self.name = f"int{bits}"

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        shape = check_kv(k, v)
        tensors: dict[str, torch.Tensor] = {}
        for part, x in (("k", k), ("v", v)):
            codes, scale, zero = quantize_groups(x, self.bits, self.group_size)  # [t, b, n_kv, *]
            tensors |= {f"{part}_codes": codes, f"{part}_scale": scale, f"{part}_zero": zero}
        return EncodedKV(self.name, shape, tensors)

    def decode(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        check_codec(enc, self.name)
        d = enc.shape[3]
        ts = enc.tensors
        k, v = (
            dequantize_groups(ts[f"{p}_codes"], ts[f"{p}_scale"], ts[f"{p}_zero"], self.bits, d, dtype)
            for p in ("k", "v")
        )
        return k, v  # [t, b, n_kv, d]

    def nbytes(self, enc: EncodedKV) -> int:
        return enc.nbytes

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float:
        return float(2 * b * n_kv * group_bytes(d, self.bits, self.group_size))


class GroupQuantInputs:
    """Layer inputs X stored for recomputation, per token, ``bits`` asymmetric in groups of
    ``group_size`` channels (``--x-codec int8|int4``): with K,V compressed too, or a GQA model whose
    X is larger than its K,V, a smaller X is what lets recomputation pay (DESIGN.md section 3).

    Tokenwise like the host tier: ``encode`` of [t, b, h] returns parts with the token axis first.
    """

    def __init__(self, bits: int, group_size: int = 32) -> None:
        self.bits, self.group_size = _checked_group(bits, group_size, (4, 8), "--x-codec")
        self.name = f"int{bits}"

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """[t, b, h] -> x_codes uint8 [t, b, h * bits / 8], x_scale and x_zero fp16 [t, b, h / G]."""
        if x.dim() != 3:
            raise KvprError(f"X must be [t, b, h], not {tuple(x.shape)}")
        codes, scale, zero = quantize_groups(x, self.bits, self.group_size)
        return {"x_codes": codes, "x_scale": scale, "x_zero": zero}

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Inverse of :meth:`encode`: [t, b, h] in ``dtype``."""
        h = parts["x_scale"].shape[-1] * self.group_size
        return dequantize_groups(parts["x_codes"], parts["x_scale"], parts["x_zero"], self.bits, h, dtype)

    def bytes_per_token(self, b: int, h: int) -> float:
        """Stored bytes of one token's X for a batch of ``b``, scales and zeros included."""
        return float(b * group_bytes(h, self.bits, self.group_size))
