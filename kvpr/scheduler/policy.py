"""The recompute policy of a run: maps the context length ``s`` to the recomputed prefix ``l``.

``off`` copies all K,V; a fraction F fixes ``l = round(F*s)``; ``auto`` asks the solver every
step with the measured hardware profile, so ``l`` follows ``s`` as it grows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvpr.config import DEFAULT_NUM_CHUNKS, RECOMPUTE_AUTO, RECOMPUTE_OFF, CacheConfig, ModelConfig, RuntimeConfig
from kvpr.device import element_size
from kvpr.scheduler.plan import StepSplit

if TYPE_CHECKING:
    from kvpr.cache.codec import KVCodec, XCodec
    from kvpr.scheduler.profile import HardwareProfile

SplitPolicy = Callable[[int], StepSplit]  # host-tier tokens s -> that decode step's split


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


def stored_element_bytes(
    model: ModelConfig, dtype: torch.dtype, codec: KVCodec | None, x_codec: XCodec | None = None
) -> tuple[float, float]:
    """Bytes per element of X and of K (or V) as the host tier stores them: X under ``x_codec`` or
    in the model dtype, K,V under ``codec`` or in the model dtype (metadata included, so possibly
    fractional)."""
    model_bytes = element_size(dtype)
    x_bytes = model_bytes if x_codec is None else x_codec.bytes_per_token(1, model.hidden_size) / model.hidden_size
    return x_bytes, (model_bytes if codec is None else kv_bytes_per_element(codec, model))


def recompute_may_run(
    cache: CacheConfig, model: ModelConfig, dtype: torch.dtype, codec: KVCodec | None, x_codec: XCodec | None = None
) -> bool:
    """Whether any decode step of a run can choose ``l > 0``: recomputation is on and, for
    ``auto``, can pay at all (see ``recompute_can_pay``). Only then is X worth storing."""
    if cache.recompute == RECOMPUTE_OFF:
        return False
    if cache.recompute == RECOMPUTE_AUTO:
        return recompute_can_pay(model, *stored_element_bytes(model, dtype, codec, x_codec))
    return True


def make_split_policy(
    cache: CacheConfig,
    runtime: RuntimeConfig,
    model: ModelConfig,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    codec: "KVCodec | None" = None,
    x_codec: "XCodec | None" = None,
    gpu_tokens: int = 0,
) -> SplitPolicy:
    """Build the per-step policy for one batch (``codec``, ``x_codec``: how K,V and X are stored
    on the host; ``gpu_tokens``: the GPU tier's slots, attended beside the host's tokens)."""
    if not recompute_may_run(cache, model, dtype, codec, x_codec):
        return lambda context_len: StepSplit(0)
    if cache.recompute != RECOMPUTE_AUTO:
        fraction, chunks = float(cache.recompute), runtime.num_chunks or DEFAULT_NUM_CHUNKS
        return lambda context_len: StepSplit(round_fraction(fraction, context_len), chunks)
    from kvpr.scheduler.profiler import load_or_measure

    measured = load_or_measure(device, model, dtype, batch_size, path=runtime.profile_path)
    profile = planning_profile(measured, runtime, device, dtype, codec, x_codec)
    x_bytes, kv_bytes = stored_element_bytes(model, dtype, codec, x_codec)
    x_name = "none" if x_codec is None else x_codec.name
    kv_name = "none" if codec is None else codec.name
    return auto_policy(model, batch_size, profile, x_bytes, kv_bytes, runtime.num_chunks, x_name, kv_name, gpu_tokens)


def planning_profile(
    profile: "HardwareProfile",
    runtime: RuntimeConfig,
    device: torch.device,
    dtype: torch.dtype,
    codec: "KVCodec | None",
    x_codec: "XCodec | None",
) -> "HardwareProfile":
    """The rates the scheduler plans a latency-mode step with: where steps that load host chunks
    replay as CUDA graphs (``kvpr.runtime.graphs``), one launch a step, so no per-layer host issue."""
    from kvpr.runtime.graphs import graphs_cover_host_steps

    if graphs_cover_host_steps(runtime.step_graphs, device, dtype, codec is None, x_codec is None):
        return profile.without_host_issue()
    return profile


def kv_bytes_per_element(codec: "KVCodec", model: ModelConfig) -> float:
    """Stored bytes per K (or V) element under ``codec``, metadata included (fractional)."""
    return codec.bytes_per_token(1, model.num_kv_heads, model.head_dim) / (2 * model.kv_size)


def auto_policy(
    model: ModelConfig,
    batch_size: int,
    profile: "HardwareProfile",
    x_bytes: float,
    kv_bytes: float,
    num_chunks: int | None,
    x_codec: str = "none",
    kv_codec: str = "none",
    gpu_tokens: int = 0,
) -> SplitPolicy:
    """The solver's choice at each host-tier length (memoised: one solve per distinct ``s``), the
    chunk count too when ``num_chunks`` is None; ``x_bytes``/``kv_bytes``: stored bytes per element
    (``stored_element_bytes``); ``x_codec``, ``kv_codec``: their codecs' names; ``gpu_tokens``: the
    GPU tier's slots, whose attention the step also costs (its tail fills and flushes, so it is
    counted full)."""
    from kvpr.scheduler.cost_model import Schedule
    from kvpr.scheduler.plan import plan_decode_step

    @functools.cache
    def split(context_len: int) -> StepSplit:
        plan = plan_decode_step(
            model,
            batch_size,
            context_len,
            profile,
            kv_bytes,
            x_bytes,
            Schedule.CHUNKED,
            num_chunks,
            x_codec=x_codec,
            kv_codec=kv_codec,
            resident_len=gpu_tokens,
        )
        return plan.step_split

    return split
