"""4-bit group-wise weights for throughput mode's streamed layers (``--compress-weight``).

FlexGen's ``--compress-weight`` scheme: asymmetric min/max quantisation, 4 bits, groups of 64
values with an fp16 scale and zero each. kvpr groups along the input dim (a weight is
``[n_out, n_in]``, groups run along ``n_in``; FlexGen groups along dim 0); where ``n_in`` is not a
multiple of 64 the group is ``gcd(64, n_in)``. 1-D tensors (biases, norms) stay in the model dtype,
as FlexGen keeps them. The arithmetic is :func:`kvpr.compress.quant.quantize_groups` and
``dequantize_groups``, so a decoded weight equals the quantiser's round trip bit for bit.

A tensor's encoding is one byte string (codes, then scale, then zero, each 16-byte aligned), so a
layer's streamed share is one flat ``uint8`` buffer copied in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpr.compress.packing import packed_len
from kvpr.compress.quant import dequantize_groups, quantize_groups

WEIGHT_BITS = 4
WEIGHT_GROUP = 64
_ALIGN = 16  # bytes: every segment starts aligned, so its bytes can be viewed as fp16


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class WeightLayout:
    """Where one tensor's encoding lies in its byte string: shape, dtype, and the byte ranges of
    its parts (``compressed``: codes, scale, zero; else the raw values)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    compressed: bool
    group: int
    nbytes: int  # aligned length of the byte string

    @classmethod
    def of(cls, shape: tuple[int, ...], dtype: torch.dtype) -> "WeightLayout":
        if len(shape) != 2:
            raw = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            return cls(tuple(shape), dtype, False, 0, _aligned(raw))
        n_out, n_in = shape
        group = math.gcd(WEIGHT_GROUP, n_in)
        codes = _aligned(n_out * packed_len(n_in, WEIGHT_BITS))
        meta = _aligned(2 * n_out * (n_in // group))
        return cls(tuple(shape), dtype, True, group, codes + 2 * meta)

    def _segments(self) -> tuple[int, int]:
        n_out, n_in = self.shape
        return _aligned(n_out * packed_len(n_in, WEIGHT_BITS)), _aligned(2 * n_out * (n_in // self.group))

    def encode(self, weight: torch.Tensor) -> torch.Tensor:
        """The byte string [nbytes] (uint8, on ``weight``'s device) of ``weight`` [n_out, n_in]."""
        assert tuple(weight.shape) == self.shape, (tuple(weight.shape), self.shape)
        out = torch.zeros(self.nbytes, dtype=torch.uint8, device=weight.device)
        if not self.compressed:
            raw = weight.to(self.dtype).contiguous().reshape(-1).view(torch.uint8)
            out[: raw.numel()] = raw
            return out
        codes, scale, zero = quantize_groups(weight, WEIGHT_BITS, self.group)  # [n_out, n_in/2], [n_out, n_in/G] x2
        codes_len, meta_len = self._segments()
        out[: codes.numel()] = codes.reshape(-1)
        for start, part in ((codes_len, scale), (codes_len + meta_len, zero)):
            raw = part.contiguous().reshape(-1).view(torch.uint8)
            out[start : start + raw.numel()] = raw
        return out

    def decode(self, encoded: torch.Tensor) -> torch.Tensor:
        """``weight`` [n_out, n_in] in the model dtype from its byte string (on its device)."""
        if not self.compressed:
            numel = math.prod(self.shape)
            size = torch.empty((), dtype=self.dtype).element_size()
            return encoded[: numel * size].view(self.dtype).view(self.shape)
        n_out, n_in = self.shape
        codes_len, meta_len = self._segments()
        groups = n_in // self.group
        codes = encoded[: n_out * packed_len(n_in, WEIGHT_BITS)].view(n_out, -1)
        scale = encoded[codes_len : codes_len + 2 * n_out * groups].view(torch.float16).view(n_out, groups)
        zero = encoded[codes_len + meta_len : codes_len + meta_len + 2 * n_out * groups].view(torch.float16)
        return dequantize_groups(codes, scale, zero.view(n_out, groups), WEIGHT_BITS, n_in, self.dtype)


def round_trip(weight: torch.Tensor) -> torch.Tensor:
    """What ``--compress-weight`` makes of ``weight``: the quantiser's round trip in its dtype (1-D
    tensors unchanged). The oracle of the tests."""
    layout = WeightLayout.of(tuple(weight.shape), weight.dtype)
    return layout.decode(layout.encode(weight))


def encoded_ratio(shapes: list[tuple[int, ...]], dtype_bytes: int) -> float:
    """Encoded bytes over model-dtype bytes of a layer's tensors (``shapes``), for the cost model.
    Alignment padding is left out: under 16 bytes a tensor."""
    raw = sum(math.prod(shape) for shape in shapes) * dtype_bytes
    encoded = 0.0
    for shape in shapes:
        if len(shape) == 2:
            n_out, n_in = shape
            encoded += n_out * (packed_len(n_in, WEIGHT_BITS) + 4 * (n_in // math.gcd(WEIGHT_GROUP, n_in)))
        else:
            encoded += math.prod(shape) * dtype_bytes
    return encoded / raw
