"""Throughput mode's cost model: one block of FlexGen's schedule, affine in the placement shares.

A block (``num_gpu_batches`` GPU batches of ``gpu_batch_size`` sequences) runs the zig-zag schedule:
per layer the weights are loaded once, then every GPU batch loads its cache, computes and stores, with
loads, stores, disk traffic and compute overlapped, so a layer costs the largest of five terms
(FlexGen's model). Every term and every tier's memory is affine in the placement shares, so for one
block shape the best placement is a linear program.

Modelling decisions (the executor must match them for the prediction to hold):
- Cache tiers are token ranges of the ``s_max = s0 + n`` slots (``cache_slot_ranges``). Decode is
  costed at the mean step (context ``s0 + (n-2)/2``, ``n - 1`` steps), as FlexGen does. Token counts
  per tier, ``min(s, gpu_end)`` etc., are not linear, so the LP counts them with variables bounded by
  the slots (``t_gpu <= gpu_end``, ``t_gpu + t_cpu <= cpu_end``): it could only demote tokens to a
  slower tier, which never lowers any term, so its optimum is exact.
- Recomputation (r): the oldest ``r`` of the CPU tier's tokens send X and recompute K,V; X is stored
  for every cached token when ``r > 0``. The bilinear ``r * cc`` is removed by a change of variables:
  the CPU tier's tokens at the mean step are split into an X range and a K,V range (two LP variables),
  one LP with X stored and one without, so r is chosen exactly; the disk share is never recomputed.
- Weights follow FlexGen's midpoint rule per tensor (``weight_shares``), activations go whole to the
  tier holding their 50th percentile: the LP treats both as continuous, then the search snaps them
  and re-solves (``throughput_policy``). Cache percentages are rounded to integers and re-checked by ``estimate``.
- Rates: copies at the size of one whole (layer, GPU batch) transfer (optimistic for small shares),
  GEMMs at the profile's curve (the recompute shape stands in for every GEMM; decode GEMMs are scaled
  to the profile's measured ``decode_layer_s``), decode attention from the profile scaled by batch.
  The new token's store is split across tiers like the mean context (it is ~1/s of the load traffic).
  The LM head runs once per step after the last layer, outside the overlapped terms.
- Compression (``--compress-weight``, ``--kv-codec int8|int4``, ``--x-codec``): the bytes the tiers
  hold, copy and write are ``throughput_bytes``'s (encoded off the GPU). The decode of copied K,V
  is compute time where the profile measured the codec (``kv_decode``), and recomputation runs at the
  X codec's measured rate (``x_codec_gemm``, its decode included); the weights' decode has no
  measured rate yet and is not counted (only their bytes are).
- Memory: ``memory_terms`` (``throughput_bytes``), the one formula for the LP's rows, ``estimate``'s
  check and the run's own check before allocating (``throughput_memory``), so a plan always passes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from kvpr.config import ModelConfig
from kvpr.errors import KvprError
from kvpr.scheduler.throughput_bytes import (
    GIB,
    NO_CODECS,
    BlockCosts,
    CacheCodecs,
    Shares,
    ThroughputWorkload,
    block_sizes,
    layer_weight_tensors,
    memory_terms,
    realised_shares,
)
from kvpr.throughput_config import ThroughputConfig, Tier

if TYPE_CHECKING:
    from kvpr.scheduler.profile import HardwareProfile


@dataclass(frozen=True)
class MachineLimits:
    """Memory the policy may use per tier (bytes) and the offload disk's sequential rates (bytes/s)."""

    gpu_bytes: float
    cpu_bytes: float
    disk_bytes: float
    disk_read_bps: float
    disk_write_bps: float

    def __post_init__(self) -> None:
        for name in ("gpu_bytes", "cpu_bytes", "disk_bytes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise KvprError(f"machine limits: {name}={value} must be a byte count >= 0")
        if self.gpu_bytes <= 0:
            raise KvprError("machine limits: gpu_bytes=0: throughput mode needs GPU memory for its buffers")
        for name in ("disk_read_bps", "disk_write_bps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise KvprError(f"machine limits: {name}={value} must be > 0 bytes/s: measure the offload disk")

    def capacity(self, tier: Tier) -> float:
        return {Tier.GPU: self.gpu_bytes, Tier.CPU: self.cpu_bytes, Tier.DISK: self.disk_bytes}[tier]


@dataclass(frozen=True)
class ThroughputPlan:
    """A policy and its predicted cost for one block; times in seconds, memory in bytes."""

    config: ThroughputConfig
    recompute_fraction: float
    workload: ThroughputWorkload
    prefill_s: float  # the block's prefill
    decode_s: float  # the block's n - 1 decode steps
    tokens_per_s: float  # block_size * gen_len / (prefill_s + decode_s), as FlexGen reports
    decode_tokens_per_s: float  # block_size * (gen_len - 1) / decode_s
    memory_bytes: Mapping[str, float]  # peak per tier: gpu, cpu, disk
    memory_items: Mapping[str, Mapping[str, float]]  # per tier: what the executor allocates
    breakdown: Mapping[str, str]  # phase -> the term that bounds a layer
    layer_terms_s: Mapping[str, Mapping[str, float]]  # phase -> term -> seconds per layer
    bound_tokens_per_s: float | None = None  # the LP's continuous optimum for this block shape (searches only)

    def to_dict(self) -> dict[str, Any]:
        return {
            "percent": list(self.config.placement.as_percent()),
            "gpu_batch_size": self.config.gpu_batch_size,
            "num_gpu_batches": self.config.num_gpu_batches,
            "block_size": self.config.block_size,
            "recompute_fraction": self.recompute_fraction,
            "prompt_len": self.workload.prompt_len,
            "gen_len": self.workload.gen_len,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "tokens_per_s": self.tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "memory_bytes": dict(self.memory_bytes),
            "memory_items": {tier: dict(items) for tier, items in self.memory_items.items()},
            "breakdown": dict(self.breakdown),
            "layer_terms_s": {phase: dict(terms) for phase, terms in self.layer_terms_s.items()},
            "bound_tokens_per_s": self.bound_tokens_per_s,
        }


# ---------------------------------------------------------------- the time terms, affine in the shares


def block_costs(
    model: ModelConfig,
    profile: HardwareProfile,
    limits: MachineLimits,
    workload: ThroughputWorkload,
    gpu_batch_size: int,
    num_gpu_batches: int,
    stores_x: bool,
    dtype_bytes: int,
    codecs: CacheCodecs = NO_CODECS,
    compress_weight: bool = False,
) -> BlockCosts:
    sizes = block_sizes(
        model, workload, gpu_batch_size, num_gpu_batches, stores_x, dtype_bytes, codecs, compress_weight
    )
    h, q, kv = model.hidden_size, model.q_size, model.kv_size  # widths, for the FLOP counts
    gbs, s0, mean = gpu_batch_size, workload.prompt_len, workload.mean_context
    matrices = [math.prod(shape) for _, shape in layer_weight_tensors(model) if len(shape) == 2]
    kv_bytes, token_bytes = sizes.kv_token_bytes, sizes.token_bytes  # per token, as stored
    x_bytes = sizes.hidden_bytes  # activations cross in the model dtype
    gemm, h2d, d2h = profile.gemm.rate, profile.h2d.rate, profile.d2h.rate
    flops_per_row = 2.0 * sum(matrices)  # every projection and MLP GEMM, per token
    calibration = 1.0  # scales the decode GEMMs to the measured layer, where the profile has it
    same_shape = (profile.gemm_hidden, profile.gemm_kv_width) == (h, 2 * kv)
    if profile.decode_layer_s is not None and same_shape:
        calibration = profile.decode_layer_s / (profile.batch_size * flops_per_row / gemm(profile.batch_size))
    prefill_rows = gbs * s0
    prefill = (prefill_rows * flops_per_row + 4.0 * gbs * s0 * s0 * q) / gemm(prefill_rows)  # GEMMs, QK^T and PV
    attention = profile.attention_s(round(mean) + 1) * gbs / profile.batch_size
    # the X codec's measured recompute rate includes its decode; the K,V codec's decode of one unit
    x_curve = profile.x_codec_gemm.get(codecs.x_codec) if stores_x else None
    recompute_gemm = gemm if x_curve is None else x_curve.rate
    kv_curve = profile.kv_decode.get(codecs.kv_codec)
    kv_decode = None if kv_curve is None else kv_curve.rate
    unit_kv = gbs * mean * kv_bytes  # stored bytes of one (layer, GPU batch) at the mean step
    decode = calibration * gbs * flops_per_row / gemm(gbs) + attention
    return replace(
        sizes,
        rates={
            "weights_h2d": h2d(sum(matrices) * dtype_bytes / len(matrices)),  # one weight matrix per copy
            "cache_h2d": h2d(gbs * mean * kv_bytes),  # one (layer, GPU batch) K,V
            "prefill_d2h": d2h(gbs * s0 * token_bytes),
            "decode_d2h": d2h(gbs * token_bytes),
            "act_prefill_h2d": h2d(gbs * s0 * x_bytes),  # one GPU batch's hidden states, [gbs, s0, h]
            "act_prefill_d2h": d2h(gbs * s0 * x_bytes),
            "act_decode_h2d": h2d(gbs * x_bytes),
            "act_decode_d2h": d2h(gbs * x_bytes),
            "disk_read": limits.disk_read_bps,
            "disk_write": limits.disk_write_bps,
        },
        prefill_compute_s=num_gpu_batches * prefill,
        decode_compute_s=num_gpu_batches * decode,
        recompute_all_s=gbs * num_gpu_batches * mean * 4.0 * h * kv / recompute_gemm(gbs * mean),
        decode_all_s=num_gpu_batches * unit_kv / kv_decode(unit_kv) if kv_decode is not None else 0.0,
        head_s=num_gpu_batches * 2.0 * gbs * (model.word_embed_proj_dim or h) * model.vocab_size / gemm(gbs),
    )


class CostTerms(NamedTuple):
    prefill: dict[str, Any]  # term -> seconds per layer
    decode: dict[str, Any]  # term -> seconds per layer and step
    memory: dict[Tier, dict[str, Any]]  # tier -> item -> bytes


def cost_terms(b: BlockCosts, v: Shares) -> CostTerms:
    """The cost model, written once: only sums and scalar products of the shares, so the same code
    evaluates a placement (floats) and builds the LP's rows (coefficient vectors)."""
    r, bs, s0, mean, tok = b.rates, b.block_size, b.workload.prompt_len, b.workload.mean_context, b.token_bytes
    weights_in = b.stored_layer_bytes * (v.wc + v.wd)  # bytes of a layer crossing PCIe, once per block
    act_pre, act_dec = b.act_prefill_bytes, b.act_decode_bytes
    prefill = {
        "h2d": weights_in / r["weights_h2d"] + act_pre * (v.ac + v.ad) / r["act_prefill_h2d"],
        "d2h": bs * s0 * tok * (v.pc + v.pd) / r["prefill_d2h"] + act_pre * (v.ac + v.ad) / r["act_prefill_d2h"],
        "disk_read": (b.stored_layer_bytes * v.wd + act_pre * v.ad) / r["disk_read"],
        "disk_write": (bs * s0 * tok * v.pd + act_pre * v.ad) / r["disk_write"],
        "compute": b.prefill_compute_s * v.one,
    }
    cache_in = bs * mean * (b.x_token_bytes * v.tcx + b.kv_token_bytes * (v.tck + v.td))
    decode = {
        "h2d": weights_in / r["weights_h2d"]
        + cache_in / r["cache_h2d"]
        + act_dec * (v.ac + v.ad) / r["act_decode_h2d"],
        "d2h": bs * tok * (v.tcx + v.tck + v.td) / r["decode_d2h"] + act_dec * (v.ac + v.ad) / r["act_decode_d2h"],
        "disk_read": (b.stored_layer_bytes * v.wd + bs * mean * b.kv_token_bytes * v.td + act_dec * v.ad)
        / r["disk_read"],
        "disk_write": (bs * tok * v.td + act_dec * v.ad) / r["disk_write"],
        "compute": b.decode_compute_s * v.one + b.recompute_all_s * v.tcx + b.decode_all_s * (v.tck + v.td),
    }
    return CostTerms(prefill, decode, memory_terms(b, v))


# ---------------------------------------------------------------- one fixed policy


def check_workload(model: ModelConfig, workload: ThroughputWorkload) -> None:
    if workload.max_len > model.max_position:
        raise KvprError(
            f"prompt {workload.prompt_len} + generation {workload.gen_len} tokens exceed the model's context "
            f"of {model.max_position}: shorten the workload"
        )


def estimate(
    model: ModelConfig,
    profile: HardwareProfile,
    limits: MachineLimits,
    workload: ThroughputWorkload,
    config: ThroughputConfig,
    recompute_fraction: float,
    dtype_bytes: int = 2,
    codecs: CacheCodecs = NO_CODECS,
) -> ThroughputPlan:
    """Predicted cost of one fixed policy (weights compressed as ``config`` says, the cache tiers
    under ``codecs``); raises KvprError naming the tier that overflows."""
    r = recompute_fraction
    if not 0.0 <= r <= 1.0:
        raise KvprError(f"recompute fraction {r}: must lie in [0, 1]")
    check_workload(model, workload)
    gbs, ngb = config.gpu_batch_size, config.num_gpu_batches
    block = block_costs(model, profile, limits, workload, gbs, ngb, r > 0, dtype_bytes, codecs, config.compress_weight)
    terms = cost_terms(block, realised_shares(model, config.placement, workload, r))
    for tier, items in terms.memory.items():
        need, have = sum(items.values()), limits.capacity(tier)
        if need > have:
            what = "disk space" if tier is Tier.DISK else f"{tier.value} memory"
            raise KvprError(
                f"--percent {config.placement} at gpu batch {gbs} x {ngb} needs {need / GIB:.2f} GiB of {what}, "
                f"{have / GIB:.2f} GiB available ({(need - have) / GIB:.2f} GiB over): lower the "
                f"{tier.value} shares or the batch"
            )
    layer_pre, layer_dec = max(terms.prefill.values()), max(terms.decode.values())
    prefill_s = model.num_layers * layer_pre + block.head_s
    decode_s = workload.decode_steps * (model.num_layers * layer_dec + block.head_s)
    return ThroughputPlan(
        config=config,
        recompute_fraction=r,
        workload=workload,
        prefill_s=prefill_s,
        decode_s=decode_s,
        tokens_per_s=block.block_size * workload.gen_len / (prefill_s + decode_s),
        decode_tokens_per_s=block.block_size * workload.decode_steps / decode_s if decode_s > 0 else 0.0,
        memory_bytes={tier.value: float(sum(items.values())) for tier, items in terms.memory.items()},
        memory_items={tier.value: {k: float(v) for k, v in items.items()} for tier, items in terms.memory.items()},
        breakdown={
            "prefill": max(terms.prefill, key=terms.prefill.__getitem__),
            "decode": max(terms.decode, key=terms.decode.__getitem__),
        },
        layer_terms_s={"prefill": dict(terms.prefill), "decode": dict(terms.decode)},
    )
