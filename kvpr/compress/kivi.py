"""KIVI-style 2-bit codec: keys per channel, values per token, newest partial group kept fp16.

Keys have outlier channels, so they are quantised per channel over groups of ``token_group``
tokens; values per token over ``group_size`` channels. Tokens that do not yet fill a key group
(the residual, ``t % token_group`` newest tokens) stay fp16, as in KIVI.
"""

from __future__ import annotations

import torch

from kvpr.cache.codec import EncodedKV, check_codec, check_kv, owned
from kvpr.compress.packing import pack_bits, packed_len, unpack_bits
from kvpr.compress.quant import (
    dequantize,
    dequantize_groups,
    fit_range,
    group_bytes,
    quantize,
    quantize_groups,
)
from kvpr.errors import KvprError


class KiviCodec:
    """K per channel (groups of ``token_group`` tokens), V per token (groups of ``group_size``)."""

    tokenwise = False  # token groups / windows: not sliceable per token

    def __init__(self, bits: int = 2, group_size: int = 32, token_group: int = 32) -> None:
        if bits not in (2, 4, 8):
            raise KvprError(f"kivi supports 2, 4 or 8 bits, not {bits}")
        for label, value in (("group_size", group_size), ("token_group", token_group)):
            if not isinstance(value, int) or value <= 0:
                raise KvprError(f"kivi {label} must be a positive int, not {value!r}")
        self.bits = bits
        self.group_size = group_size
        self.token_group = token_group
        self.name = f"kivi{bits}"

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        t, b, n_kv, d = check_kv(k, v)
        if d % self.group_size:
            raise KvprError(f"head_dim {d} is not a multiple of kivi group_size {self.group_size}")
        full = t - t % self.token_group
        levels = (1 << self.bits) - 1
        kg = k[:full].reshape(full // self.token_group, self.token_group, b, n_kv, d)
        k_scale, k_zero = fit_range(kg, 1, levels)  # [t/T, 1, b, n_kv, d]
        k_codes = quantize(kg, k_scale, k_zero, levels).reshape(full, b, n_kv, d)
        v_codes, v_scale, v_zero = quantize_groups(v[:full], self.bits, self.group_size)
        tensors = {
            "k_codes": pack_bits(k_codes, self.bits),  # [full, b, n_kv, d*bits/8]
            "k_scale": k_scale.squeeze(1),  # [full/T, b, n_kv, d]
            "k_zero": k_zero.squeeze(1),
            "v_codes": v_codes,  # [full, b, n_kv, d*bits/8]
            "v_scale": v_scale,  # [full, b, n_kv, d/G]
            "v_zero": v_zero,
            "k_residual": owned(k[full:], torch.float16),  # [t - full, b, n_kv, d]
            "v_residual": owned(v[full:], torch.float16),
        }
        return EncodedKV(self.name, (t, b, n_kv, d), tensors)

    def decode(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        check_codec(enc, self.name)
        t, b, n_kv, d = enc.shape
        ts = enc.tensors
        full = ts["k_codes"].shape[0]
        codes = unpack_bits(ts["k_codes"], self.bits, d)
        codes = codes.reshape(full // self.token_group, self.token_group, b, n_kv, d)
        k = dequantize(codes, ts["k_scale"].unsqueeze(1), ts["k_zero"].unsqueeze(1))
        v = dequantize_groups(ts["v_codes"], ts["v_scale"], ts["v_zero"], self.bits, d)
        k = torch.cat([k.reshape(full, b, n_kv, d).to(dtype), ts["k_residual"].to(dtype)])
        v = torch.cat([v.to(dtype), ts["v_residual"].to(dtype)])
        return k, v  # [t, b, n_kv, d]

    def nbytes(self, enc: EncodedKV) -> int:
        return enc.nbytes

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float:
        k_bytes = packed_len(d, self.bits) + 4 * d / self.token_group
        v_bytes = group_bytes(d, self.bits, self.group_size)
        return float(b * n_kv * (k_bytes + v_bytes))
