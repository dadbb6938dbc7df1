"""KIVI-style codecs at 2, 3, 4 or 8 bits: keys per channel, values per token, the newest partial
group kept fp16, optionally Hadamard-rotated first.

Keys have outlier channels, so they are quantised per channel over groups of ``token_group``
tokens; values per token over ``group_size`` channels. Tokens that do not yet fill a key group
(the residual, ``t % token_group`` newest tokens) stay fp16, as in KIVI; a cache method keeps a
longer recent window the same way (``KiviConfig.residual``). With ``rotate`` the rotated K and/or V
(``kvpr.compress.rotation``) are quantised and the decode un-rotates after dequantising, so the
K,V it returns are in the model's basis: the codec contract and attention are unchanged.

On CUDA, ``decode`` runs one fused Triton kernel per part (unpack, dequantise, inverse rotation,
cast; ``kvpr.compress.kivi_triton``); ``decode_reference`` is the plain torch oracle, and the path
everywhere else.
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
from kvpr.compress.rotation import Rotated, check_rotation, hadamard
from kvpr.errors import KvprError

KIVI_BITS: tuple[int, ...] = (2, 3, 4, 8)


class KiviCodec(Rotated):
    """K per channel (groups of ``token_group`` tokens), V per token (groups of ``group_size``),
    ``bits`` each; ``rotate`` in none, k, v, kv (which parts are Hadamard-rotated before quantising).

    Parts: ``k_codes`` [full, b, n_kv, packed(d)], ``k_scale``/``k_zero`` fp16 [full/T, b, n_kv, d],
    ``v_codes`` [full, b, n_kv, packed(d)], ``v_scale``/``v_zero`` fp16 [full, b, n_kv, d/G],
    ``k_residual``/``v_residual`` fp16 [t - full, b, n_kv, d], with ``full = t - t % T``.
    """

    tokenwise = False  # token groups / windows: not sliceable per token

    def __init__(self, bits: int = 2, group_size: int = 32, token_group: int = 32, rotate: str = "none") -> None:
        if bits not in KIVI_BITS:
            raise KvprError(f"kivi supports {', '.join(map(str, KIVI_BITS))} bits, not {bits}")
        for label, value in (("group_size", group_size), ("token_group", token_group)):
            if not isinstance(value, int) or value <= 0:
                raise KvprError(f"kivi {label} must be a positive int, not {value!r}")
        self.bits = bits
        self.group_size = group_size
        self.token_group = token_group
        self.rotate = check_rotation(rotate)
        self.name = f"kivi{bits}"

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        t, b, n_kv, d = check_kv(k, v)
        if d % self.group_size:
            raise KvprError(f"head_dim {d} is not a multiple of kivi group_size {self.group_size}")
        check_rotation(self.rotate, d)
        full = t - t % self.token_group
        levels = (1 << self.bits) - 1
        kq = hadamard(k[:full]) if self.rotates_k else k[:full]  # [full, b, n_kv, d]
        vq = hadamard(v[:full]) if self.rotates_v else v[:full]
        kg = kq.reshape(full // self.token_group, self.token_group, b, n_kv, d)
        k_scale, k_zero = fit_range(kg, 1, levels)  # [t/T, 1, b, n_kv, d]
        k_codes = quantize(kg, k_scale, k_zero, levels).reshape(full, b, n_kv, d)
        v_codes, v_scale, v_zero = quantize_groups(vq, self.bits, self.group_size)
        tensors = {
            "k_codes": pack_bits(k_codes, self.bits),  # [full, b, n_kv, packed(d)]
            "k_scale": k_scale.squeeze(1),  # [full/T, b, n_kv, d]
            "k_zero": k_zero.squeeze(1),
            "v_codes": v_codes,  # [full, b, n_kv, packed(d)]
            "v_scale": v_scale,  # [full, b, n_kv, d/G]
            "v_zero": v_zero,
            "k_residual": owned(k[full:], torch.float16),  # [t - full, b, n_kv, d]
            "v_residual": owned(v[full:], torch.float16),
        }
        return EncodedKV(self.name, (t, b, n_kv, d), tensors)

    def decode(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Both [t, b, n_kv, d] in ``dtype``: the fused Triton kernel on CUDA, else the torch oracle."""
        check_codec(enc, self.name)
        if enc.tensors["k_codes"].is_cuda and dtype in (torch.float16, torch.bfloat16, torch.float32):
            from kvpr.compress.kivi_triton import triton_available

            if triton_available():
                from kvpr.compress.kivi_triton import decode_fused

                return decode_fused(self, enc, dtype)
        return self.decode_reference(enc, dtype)

    def decode_reference(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain torch decode (dequantise in float32, un-rotate, cast): the oracle of the kernel."""
        check_codec(enc, self.name)
        t, b, n_kv, d = enc.shape
        ts = enc.tensors
        full = ts["k_codes"].shape[0]
        codes = unpack_bits(ts["k_codes"], self.bits, d)
        codes = codes.reshape(full // self.token_group, self.token_group, b, n_kv, d)
        k = dequantize(codes, ts["k_scale"].unsqueeze(1), ts["k_zero"].unsqueeze(1)).reshape(full, b, n_kv, d)
        v = dequantize_groups(ts["v_codes"], ts["v_scale"], ts["v_zero"], self.bits, d)  # float32
        k = hadamard(k) if self.rotates_k else k
        v = hadamard(v) if self.rotates_v else v
        k = torch.cat([k.to(dtype), ts["k_residual"].to(dtype)])
        v = torch.cat([v.to(dtype), ts["v_residual"].to(dtype)])
        return k, v  # [t, b, n_kv, d]

    def nbytes(self, enc: EncodedKV) -> int:
        return enc.nbytes

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float:
        """Codes plus an fp16 scale and zero per channel per ``token_group`` tokens (K) and per
        ``group_size`` channels (V); a rotation stores nothing."""
        k_bytes = packed_len(d, self.bits) + 4 * d / self.token_group
        v_bytes = group_bytes(d, self.bits, self.group_size)
        return float(b * n_kv * (k_bytes + v_bytes))
