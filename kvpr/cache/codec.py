"""The codec contracts: how a block of cached K,V (``KVCodec``) or of stored layer inputs X
(``XCodec``) becomes bytes in a tier and back.

A tier stores whatever ``encode`` returns and moves it as named tensors; the cost model prices a
token with ``bytes_per_token``. Codecs never know which tier they live in (see kvpr/compress/).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from kvpr.errors import KvprError


@dataclass(frozen=True)
class EncodedKV:
    """An encoded block of ``num_tokens`` tokens: the codec's name, the block shape, named tensors.

    Every byte the block needs to be decoded (codes, scales, zero points, keep masks, orders) is
    one of ``tensors``, so moving the block is moving its tensors and its size is their sum.
    """

    codec: str
    shape: tuple[int, int, int, int]  # (t, b, n_kv, d) of the K (and V) block encoded
    tensors: Mapping[str, torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        """True storage in bytes: the sum over all tensors, metadata included."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EncodedKV:
        """Copy every tensor to ``device`` (asynchronous from pinned host memory if asked)."""
        moved = {n: t.to(device, non_blocking=non_blocking) for n, t in self.tensors.items()}
        return EncodedKV(self.codec, self.shape, moved)

    def pin_memory(self) -> EncodedKV:
        """Page-locked host copy, so later host-to-device copies can run asynchronously."""
        return EncodedKV(self.codec, self.shape, {n: t.pin_memory() for n, t in self.tensors.items()})


@runtime_checkable
class KVCodec(Protocol):
    """Encodes token-major K,V blocks into bytes and back.

    Contract:
        name: registry name (``make_codec(name)`` builds an equal codec).
        tokenwise: every tensor of ``encode``'s result has the token axis first and each token is
            encoded on its own, so any token range can be stored, copied and decoded by slicing
            (what a token-major host tier needs). Codecs with token groups or windows are not.
        encode(k, v) -> EncodedKV
            k, v: [t, b, n_kv, d] of one layer, any float dtype, RoPE already applied to k; any
            ``t >= 0``. Codecs with token groups keep a partial trailing group in a lossless-enough
            form (documented per codec). The result lives on the inputs' device.
        decode(enc, dtype) -> (k, v)
            both [t, b, n_kv, d] in ``dtype`` on ``enc``'s device, tokens in their original order.
        nbytes(enc) -> int
            true bytes of ``enc``: codes plus every scale, zero point, keep mask and order.
        bytes_per_token(b, n_kv, d) -> float
            K and V bytes of one token position of one layer for a batch of ``b`` in steady state
            (full groups/windows; metadata included), for the cost model.
    Raises:
        KvprError: a shape the codec cannot encode (e.g. ``d`` not a multiple of its group) or an
        ``enc`` made by another codec.
    """

    name: str
    tokenwise: bool

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV: ...

    def decode(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...

    def nbytes(self, enc: EncodedKV) -> int: ...

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float: ...


def check_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int]:
    """Assert the shared [t, b, n_kv, d] shape of a K,V block; returns it."""
    if k.dim() != 4 or k.shape != v.shape:
        raise KvprError(
            f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be [t, b, n_kv, d]; pass token-major K,V of one layer"
        )
    t, b, n_kv, d = k.shape
    return t, b, n_kv, d


def owned(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy in ``dtype``: an encoded block never aliases the caller's buffer."""
    return x.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def check_codec(enc: EncodedKV, name: str) -> None:
    """Refuse to decode a block encoded by another codec."""
    if enc.codec != name:
        raise KvprError(f"block was encoded by '{enc.codec}', not '{name}'; decode it with its codec")


_IDENTITY_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("fp16", torch.float16),
    ("bf16", torch.bfloat16),
    ("fp32", torch.float32),
)


class IdentityCodec:
    """Stores K,V as they are, cast to one float dtype: the uncompressed baseline."""

    tokenwise = True

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        names = {dt: n for n, dt in _IDENTITY_DTYPES}
        if dtype not in names:
            raise KvprError(f"identity codec stores fp16, bf16 or fp32, not {dtype}")
        self.dtype = dtype
        self.name = names[dtype]

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> EncodedKV:
        shape = check_kv(k, v)
        return EncodedKV(self.name, shape, {"k": owned(k, self.dtype), "v": owned(v, self.dtype)})

    def decode(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        check_codec(enc, self.name)
        return enc.tensors["k"].to(dtype), enc.tensors["v"].to(dtype)

    def nbytes(self, enc: EncodedKV) -> int:
        return enc.nbytes

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float:
        return float(2 * b * n_kv * d * torch.finfo(self.dtype).bits // 8)


CODEC_NAMES: tuple[str, ...] = ("fp16", "bf16", "fp32", "int8", "int4", "kivi2", "kivi3", "kivi4", "kvo")


def _kivi_builder(bits: int) -> Callable[..., KVCodec]:
    """``make_codec``'s builder of the ``bits``-bit KIVI codec (its knobs are the keywords)."""
    from kvpr.compress.kivi import KiviCodec

    def build(group_size: int = 32, token_group: int = 32, rotate: str = "none") -> KVCodec:
        return KiviCodec(bits, group_size, token_group, rotate)

    return build


def make_codec(name: str, **params: Any) -> KVCodec:
    """Build a codec by registry name with its parameters.

    Names: fp16, bf16, fp32 (no parameters); int8, int4 (``group_size``, default 32); kivi2,
    kivi3, kivi4 (2, 3, 4 bits; ``group_size`` V channels per scale, ``token_group`` K tokens per
    scale, both default 32; ``rotate`` none, k, v or kv: Hadamard-rotate those parts first); kvo
    (any :class:`kvpr.compress.kvo.KVOConfig` field).
    Raises:
        KvprError: unknown name, unknown parameter or a bad value.
    """
    from kvpr.compress.kvo import KVOCodec
    from kvpr.compress.kvo_config import KVOConfig
    from kvpr.compress.quant import GroupQuantCodec

    builders: dict[str, Callable[..., KVCodec]] = {
        "fp16": lambda: IdentityCodec(torch.float16),
        "bf16": lambda: IdentityCodec(torch.bfloat16),
        "fp32": lambda: IdentityCodec(torch.float32),
        "int8": lambda group_size=32: GroupQuantCodec(8, group_size),
        "int4": lambda group_size=32: GroupQuantCodec(4, group_size),
        **{f"kivi{bits}": _kivi_builder(bits) for bits in (2, 3, 4)},
        "kvo": lambda **kw: KVOCodec(KVOConfig.from_params(**kw)),
    }
    if name not in builders:
        raise KvprError(f"unknown KV codec '{name}': choose one of {', '.join(CODEC_NAMES)}")
    builder = builders[name]
    try:
        inspect.signature(builder).bind(**params)
    except TypeError as err:  # an unexpected keyword
        raise KvprError(f"bad parameters {sorted(params)} for codec '{name}': {err}") from None
    return builder(**params)


@runtime_checkable
class XCodec(Protocol):
    """Encodes the layer inputs X the host tier keeps for recomputation, token by token.

    Contract:
        name: registry name (``make_x_codec``).
        encode(x) -> parts: x [t, b, h] in any float dtype; a dict of tensors, each with the token
            axis first ([t, b, ...]) and each token encoded on its own, so any token range of a
            token-major tier is a slice of every part.
        decode(parts, dtype) -> x [t, b, h] in ``dtype`` on the parts' device.
        bytes_per_token(b, h) -> float: stored bytes of one token for a batch of ``b``, metadata
            included (the cost model's X bytes).
    """

    name: str

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor: ...

    def bytes_per_token(self, b: int, h: int) -> float: ...


X_CODEC_NAMES: tuple[str, ...] = ("none", "int8", "int4")


def make_x_codec(name: str, hidden_size: int) -> XCodec | None:
    """The codec of stored X by ``--x-codec`` name; None for ``none`` (X in the model dtype).
    Groups of 32 channels, or fewer where ``hidden_size`` is not a multiple of 32."""
    from kvpr.compress.quant import GroupQuantInputs

    if name not in X_CODEC_NAMES:
        raise KvprError(f"unknown --x-codec '{name}': choose one of {', '.join(X_CODEC_NAMES)}")
    if name == "none":
        return None
    return GroupQuantInputs(int(name[3:]), math.gcd(32, hidden_size))
