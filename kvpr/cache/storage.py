"""Per-layer K, V (as a codec stores them) and layer inputs X of every cached token, on one tier.

Layout: token-major, one allocation per stored part, ``[L, s_max, b, ...]``. Any token range
``[a, c)`` of a layer is then one contiguous block, so each host-to-device copy of a chunk is a
single DMA transfer (DESIGN.md section 1: a strided copy of the same bytes ran 11x slower).

    part            shape per layer                  present
    k, v            [s_max, b, n_kv, d]              uncompressed cache (identity codec)
    k_codes, ...    [s_max, b, n_kv, *]              a tokenwise codec's parts (int8, int4)
    x               [s_max, b, h]                    when recomputation may run, X as computed
    x_codes, ...    [s_max, b, *]                    ... X under an ``XCodec`` (--x-codec int8, int4)

Slots ``[0, length)`` are filled; row validity (left padding) lives in the batch state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvpr.cache.codec import EncodedKV, IdentityCodec, KVCodec, XCodec, make_codec
from kvpr.config import ModelConfig
from kvpr.device import element_size, host_empty
from kvpr.errors import KvprError


@dataclass(frozen=True)
class CacheShape:
    """Sizes that fix the storage: layers, slots, batch, heads, dtype of the model."""

    num_layers: int
    max_len: int
    batch_size: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype) -> "CacheShape":
        return cls(cfg.num_layers, max_len, batch_size, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, dtype)

    @property
    def element_size(self) -> int:
        return element_size(self.dtype)

    def kv_bytes(self, codec: KVCodec | None = None) -> int:
        """Bytes of K and V for all layers and slots, as ``codec`` stores them (metadata included)."""
        if codec is None:
            per_token = 2 * self.batch_size * self.num_kv_heads * self.head_dim * self.element_size
        else:
            per_token = codec.bytes_per_token(self.batch_size, self.num_kv_heads, self.head_dim)
        return int(self.num_layers * self.max_len * per_token)

    def x_bytes(self, codec: XCodec | None = None) -> int:
        """Bytes of X for all layers and slots, as ``codec`` stores it (None: the model dtype)."""
        if codec is None:
            per_token = float(self.batch_size * self.hidden_size * self.element_size)
        else:
            per_token = codec.bytes_per_token(self.batch_size, self.hidden_size)
        return int(self.num_layers * self.max_len * per_token)


def require_tokenwise(codec: KVCodec) -> KVCodec:
    """Raise unless ``codec`` can live in this token-major tier (see ``KVCodec.tokenwise``)."""
    if not codec.tokenwise:
        raise KvprError(
            f"codec {codec.name} groups tokens and cannot live in kvpr's token-major host tier yet: "
            "use --kv-codec fp16, int8 or int4"
        )
    return codec


def tier_codec(name: str, head_dim: int) -> KVCodec | None:
    """The host tier's K,V codec of ``--kv-codec`` (None for ``none``: K,V as computed); int8 and
    int4 in groups of 32 channels, or fewer where ``head_dim`` is not a multiple of 32."""
    if name == "none":
        return None
    params = {"group_size": math.gcd(32, head_dim)} if name in ("int8", "int4") else {}
    return require_tokenwise(make_codec(name, **params))


Layout = dict[str, tuple[tuple[int, ...], torch.dtype]]  # part -> (per-token shape, dtype)


def token_layout(codec: KVCodec, shape: CacheShape) -> Layout:
    """Per-token shape and dtype of each part ``codec`` stores, read off a one-token encoding."""
    require_tokenwise(codec)
    probe = torch.zeros(1, shape.batch_size, shape.num_kv_heads, shape.head_dim, dtype=shape.dtype)
    encoded = codec.encode(probe, probe)
    return {name: (tuple(t.shape[1:]), t.dtype) for name, t in encoded.tensors.items()}


def input_layout(codec: XCodec | None, shape: CacheShape) -> Layout:
    """The same for stored X: one part ``x`` in the model dtype, or the parts of ``codec``."""
    if codec is None:
        return {"x": ((shape.batch_size, shape.hidden_size), shape.dtype)}
    probe = torch.zeros(1, shape.batch_size, shape.hidden_size, dtype=shape.dtype)
    return {name: (tuple(t.shape[1:]), t.dtype) for name, t in codec.encode(probe).items()}


class KVStorage:
    """K,V parts (and optionally X) for all layers on one tier.

    Args:
        shape: sizes of the storage.
        device: the tier: the compute device (resident cache) or ``cpu`` (offloaded).
        pin: pin host memory (only for ``cpu`` with a CUDA compute device).
        store_inputs: also keep X, the layer inputs recomputation starts from.
        codec: how K,V are stored; None stores them as they are in the model dtype.
        x_codec: how X is stored; None stores it in the model dtype.
    The caller checks that the tier has room (``LLM.check_fits``) before constructing one.
    """

    def __init__(
        self,
        shape: CacheShape,
        device: torch.device,
        pin: bool,
        store_inputs: bool,
        codec: KVCodec | None = None,
        x_codec: XCodec | None = None,
    ) -> None:
        self.shape = shape
        self.device = device
        self.store_inputs = store_inputs
        self.codec: KVCodec = codec or IdentityCodec(shape.dtype)
        self.raw = isinstance(self.codec, IdentityCodec) and self.codec.dtype == shape.dtype
        self.length = 0
        leading = (shape.num_layers, shape.max_len)
        self._parts = {
            name: self._empty(leading + per_token, dtype, pin)  # [L, s_max, b, ...]
            for name, (per_token, dtype) in token_layout(self.codec, shape).items()
        }
        self.x_codec = x_codec
        self._x_parts = (
            {
                name: self._empty(leading + per_token, dtype, pin)  # [L, s_max, b, ...]
                for name, (per_token, dtype) in input_layout(x_codec, shape).items()
            }
            if store_inputs
            else {}
        )

    def _empty(self, shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
        if self.device.type == "cpu":
            return host_empty(shape, dtype, pin)
        return torch.empty(shape, dtype=dtype, device=self.device)

    @property
    def part_names(self) -> tuple[str, ...]:
        return tuple(self._parts)

    @property
    def x_part_names(self) -> tuple[str, ...]:
        """Parts of stored X (``x`` alone without an X codec; none when X is not stored)."""
        return tuple(self._x_parts)

    @property
    def nbytes(self) -> int:
        tensors = list(self._parts.values()) + list(self._x_parts.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def is_pinned(self) -> bool:
        tensors = [*self._parts.values(), *self._x_parts.values()]
        return self.device.type == "cpu" and all(t.is_pinned() for t in tensors)

    def part(self, name: str, layer: int) -> torch.Tensor:
        """[s_max, b, ...] one stored part of one layer (a view)."""
        return self._parts[name][layer]

    def all_layers(self, name: str) -> torch.Tensor:
        """[L, s_max, b, ...] one stored part of every layer (the tensor itself)."""
        return self._parts[name]

    def k(self, layer: int) -> torch.Tensor:
        """[s_max, b, n_kv, d] keys of one layer (a view); only for an uncompressed cache."""
        assert self.raw, "compressed storage: decode parts instead"
        return self._parts["k"][layer]

    def v(self, layer: int) -> torch.Tensor:
        """[s_max, b, n_kv, d] values of one layer (a view); only for an uncompressed cache."""
        assert self.raw, "compressed storage: decode parts instead"
        return self._parts["v"][layer]

    def x(self, layer: int) -> torch.Tensor:
        """[s_max, b, h] layer inputs of one layer (a view); only for X stored as computed."""
        if not self._x_parts:
            raise ValueError("this storage keeps no layer inputs (store_inputs=False)")
        assert self.x_codec is None, "encoded X: use x_part and decode_x"
        return self._x_parts["x"][layer]

    def x_part(self, name: str, layer: int) -> torch.Tensor:
        """[s_max, b, ...] one stored part of X of one layer (a view)."""
        return self._x_parts[name][layer]

    def encode_x(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts to store for X [t, b, h] (``x`` itself without an X codec)."""
        return {"x": x} if self.x_codec is None else self.x_codec.encode(x)

    def decode_x(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """X [t, b, h] in the model dtype from token-range slices of its parts."""
        return parts["x"] if self.x_codec is None else self.x_codec.decode(parts, self.shape.dtype)

    def encoded(self, parts: dict[str, torch.Tensor]) -> EncodedKV:
        """Wrap token-range slices of the parts ([t, b, ...] each) as the codec's encoded block."""
        num_tokens = next(iter(parts.values())).shape[0]
        s = self.shape
        return EncodedKV(self.codec.name, (num_tokens, s.batch_size, s.num_kv_heads, s.head_dim), parts)

    def reserve(self, num_tokens: int) -> int:
        """Claim the next ``num_tokens`` slots; returns the first. The caller fills them."""
        if self.length + num_tokens > self.shape.max_len:
            raise ValueError(f"cache holds {self.shape.max_len} slots; {self.length}+{num_tokens} requested")
        start = self.length
        self.length += num_tokens
        return start

    def check_integrity(self) -> None:
        """Invariants of the bookkeeping: length within bounds, shapes and tier consistent."""
        s = self.shape
        assert 0 <= self.length <= s.max_len, (self.length, s.max_len)
        for tensor in self._parts.values():
            assert tensor.shape[:3] == (s.num_layers, s.max_len, s.batch_size)
            assert tensor.device.type == self.device.type
        for tensor in self._x_parts.values():
            assert tensor.shape[:3] == (s.num_layers, s.max_len, s.batch_size)
            assert tensor.device.type == self.device.type
        if self.x_codec is None and self._x_parts:
            assert self._x_parts["x"].shape == (s.num_layers, s.max_len, s.batch_size, s.hidden_size)
