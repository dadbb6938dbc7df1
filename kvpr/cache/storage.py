"""Per-layer K, V and layer inputs X of every cached token, on one tier (device or host).

Layout: token-major, one allocation per kind, ``[L, s_max, b, ...]``. Any token range ``[a, c)``
of a layer is then one contiguous block, so each host-to-device copy of a chunk is a single DMA
transfer (DESIGN.md section 1: a strided copy of the same bytes ran 11x slower).

    index     kind   shape per layer          present
    k[layer]  K      [s_max, b, n_kv, d]      always (RoPE already applied)
    v[layer]  V      [s_max, b, n_kv, d]      always
    x[layer]  X      [s_max, b, h]            when recomputation may run (``store_inputs``)

Slots ``[0, length)`` are filled; the row validity (left padding) lives in the batch state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpr.config import ModelConfig
from kvpr.device import host_empty


@dataclass(frozen=True)
class CacheShape:
    """Sizes that fix the storage: layers, slots, batch, heads, dtype."""

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
        return torch.empty((), dtype=self.dtype).element_size()

    def kv_bytes(self) -> int:
        """Bytes of K and V for all layers and slots."""
        return 2 * self.num_layers * self.max_len * self.batch_size * self.num_kv_heads * self.head_dim * self.element_size

    def x_bytes(self) -> int:
        return self.num_layers * self.max_len * self.batch_size * self.hidden_size * self.element_size


class KVStorage:
    """K, V (and optionally X) for all layers on one tier.

    Args:
        shape: sizes of the storage.
        device: the tier: the compute device (resident cache) or ``cpu`` (offloaded).
        pin: pin host memory (only for ``cpu`` with a CUDA compute device).
        store_inputs: also keep X, the layer inputs recomputation starts from.
    The caller checks that the tier has room (``LLM.check_fits``) before constructing one.
    """

    def __init__(self, shape: CacheShape, device: torch.device, pin: bool, store_inputs: bool) -> None:
        self.shape = shape
        self.device = device
        self.store_inputs = store_inputs
        self.length = 0
        kv_shape = (shape.num_layers, shape.max_len, shape.batch_size, shape.num_kv_heads, shape.head_dim)
        x_shape = (shape.num_layers, shape.max_len, shape.batch_size, shape.hidden_size)
        self._k = self._empty(kv_shape, pin)  # [L, s_max, b, n_kv, d]
        self._v = self._empty(kv_shape, pin)  # [L, s_max, b, n_kv, d]
        self._x = self._empty(x_shape, pin) if store_inputs else None  # [L, s_max, b, h]

    def _empty(self, shape: tuple[int, ...], pin: bool) -> torch.Tensor:
        if self.device.type == "cpu":
            return host_empty(shape, self.shape.dtype, pin)
        return torch.empty(shape, dtype=self.shape.dtype, device=self.device)

    @property
    def nbytes(self) -> int:
        tensors = [self._k, self._v] + ([self._x] if self._x is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def is_pinned(self) -> bool:
        return self.device.type == "cpu" and self._k.is_pinned()

    def k(self, layer: int) -> torch.Tensor:
        """[s_max, b, n_kv, d] keys of one layer (a view)."""
        return self._k[layer]

    def v(self, layer: int) -> torch.Tensor:
        """[s_max, b, n_kv, d] values of one layer (a view)."""
        return self._v[layer]

    def x(self, layer: int) -> torch.Tensor:
        """[s_max, b, h] layer inputs of one layer (a view)."""
        if self._x is None:
            raise ValueError("this storage keeps no layer inputs (store_inputs=False)")
        return self._x[layer]

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
        assert self._k.shape == self._v.shape == (s.num_layers, s.max_len, s.batch_size, s.num_kv_heads, s.head_dim)
        assert self._k.device.type == self.device.type
        if self._x is not None:
            assert self._x.shape == (s.num_layers, s.max_len, s.batch_size, s.hidden_size)
