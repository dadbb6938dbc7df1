"""The recompute policy of a run: maps the context length ``s`` to the recomputed prefix ``l``.

``off`` copies all K,V; a fraction F fixes ``l = round(F*s)``; ``auto`` asks the solver every
step with the measured hardware profile, so ``l`` follows ``s`` as it grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING

import torch

from kvpr.config import RECOMPUTE_AUTO, RECOMPUTE_OFF, CacheConfig, ModelConfig, RuntimeConfig

if TYPE_CHECKING:
    from kvpr.cache.codec import KVCodec
    from kvpr.scheduler.profiler import HardwareProfile

SplitPolicy = Callable[[int], int]


def round_fraction(fraction: float, context_len: int) -> int:
    """``l = round(F * s)`` with halves rounded up (not to even), clamped to [0, s]."""
    return min(context_len, max(0, math.floor(fraction * context_len + 0.5)))


def recompute_can_pay(model: ModelConfig, x_bytes_per_elem: float, kv_bytes_per_elem: float) -> bool:
    """Whether any split ``l > 0`` can beat copying K,V, whatever the hardware.

    Both cost models are bounded below by the bytes crossing the link, ``t_x(l) + t_kv(s-l)``,
    which grows with ``l`` when a token's X is at least as large as its K and V. Then ``l = 0``
    is optimal and X need not even be stored (GQA models in fp16: X is 1.5-4x larger than K,V).
    """
    return model.hidden_size * x_bytes_per_elem < 2 * model.kv_size * kv_bytes_per_elem


def make_split_policy(
    cache: CacheConfig,
    runtime: RuntimeConfig,
    model: ModelConfig,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    codec: "KVCodec | None" = None,
) -> SplitPolicy:
    """Build the per-step policy for one batch (``codec``: how K,V are stored on the host)."""
    element_bytes = torch.empty((), dtype=dtype).element_size()
    kv_element_bytes = element_bytes if codec is None else kv_bytes_per_element(codec, model)
    if cache.recompute == RECOMPUTE_OFF or (
        cache.recompute == RECOMPUTE_AUTO and not recompute_can_pay(model, element_bytes, kv_element_bytes)
    ):
        return lambda context_len: 0
    if cache.recompute != RECOMPUTE_AUTO:
        fraction = float(cache.recompute)
        return lambda context_len: round_fraction(fraction, context_len)
    from kvpr.scheduler.profiler import load_or_measure

    profile = load_or_measure(device, model, dtype, batch_size, path=runtime.profile_path)
    return auto_policy(model, batch_size, profile, dtype, runtime.num_chunks, kv_element_bytes)


def kv_bytes_per_element(codec: "KVCodec", model: ModelConfig) -> float:
    """Stored bytes per K (or V) element under ``codec``, metadata included (fractional)."""
    return codec.bytes_per_token(1, model.num_kv_heads, model.head_dim) / (2 * model.kv_size)


def auto_policy(
    model: ModelConfig,
    batch_size: int,
    profile: "HardwareProfile",
    dtype: torch.dtype,
    num_chunks: int,
    kv_element_bytes: float | None = None,
) -> SplitPolicy:
    """The solver's choice at each context length (memoised: one solve per distinct ``s``)."""
    from kvpr.scheduler.cost_model import Schedule
    from kvpr.scheduler.plan import plan_decode_step

    element_bytes = torch.empty((), dtype=dtype).element_size()
    kv_bytes = kv_element_bytes if kv_element_bytes is not None else element_bytes

    @cache
    def recompute_len(context_len: int) -> int:
        plan = plan_decode_step(
            model, batch_size, context_len, profile, kv_bytes, element_bytes, Schedule.CHUNKED, num_chunks
        )
        return plan.recompute_len

    return recompute_len
