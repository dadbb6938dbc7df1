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
- Compression (``--compress-weight``, ``--kv-codec int8|int4``, ``--x-codec``): the CPU and disk tiers
  hold, copy and write encoded bytes (``CacheCodecs``; weights at ``encoded_ratio`` of the model
  dtype), the GPU tier and GPU-resident weights stay in the model dtype. The decode of copied K,V
  is compute time where the profile measured the codec (``kv_decode``), and recomputation runs at the
  X codec's measured rate (``x_codec_gemm``, its decode included); the weights' decode has no
  measured rate yet and is not counted (only their bytes are).
- Memory: per-tier items in ``ThroughputPlan.memory_items``, the sizes the executor should allocate
  (GPU: embeddings and LM head, GPU shares, two buffers of a layer's offloaded tensors, two cache
  staging buffers of one (layer, GPU batch) for s_max tokens, one GPU batch's prefill working set).
  ``memory_terms`` is the one formula: the LP's rows, ``estimate``'s check, and the run's own check
  before allocating (``throughput_memory``), so a plan always passes it.
"""

from __future__ import annotations

import math
from collections import namedtuple
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NamedTuple

from kvpr.config import Arch, ModelConfig, Placement, ThroughputConfig, Tier
from kvpr.errors import KvprError

if TYPE_CHECKING:
    from kvpr.scheduler.profile import HardwareProfile

GIB = float(1 << 30)


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
class CacheCodecs:
    """How the CPU and disk tiers store K,V and X (``--kv-codec``, ``--x-codec``: none, int8, int4)."""

    kv_codec: str = "none"
    x_codec: str = "none"

    def kv_token_bytes(self, model: ModelConfig, dtype_bytes: int) -> float:
        """Stored K,V bytes of one token, layer and sequence."""
        from kvpr.cache.storage import tier_codec

        codec = tier_codec(self.kv_codec, model.head_dim)
        raw = 2.0 * model.kv_size * dtype_bytes
        return raw if codec is None else codec.bytes_per_token(1, model.num_kv_heads, model.head_dim)

    def x_token_bytes(self, model: ModelConfig, dtype_bytes: int) -> float:
        """Stored X bytes of one token, layer and sequence."""
        from kvpr.cache.codec import make_x_codec

        codec = make_x_codec(self.x_codec, model.hidden_size)
        h = model.hidden_size
        return float(h * dtype_bytes) if codec is None else codec.bytes_per_token(1, h)


NO_CODECS = CacheCodecs()  # K,V and X stored as computed


@dataclass(frozen=True)
class ThroughputWorkload:
    """Every sequence of the block has ``prompt_len`` prompt tokens and generates ``gen_len`` tokens."""

    prompt_len: int
    gen_len: int

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.gen_len < 1:
            raise KvprError(f"workload prompt_len={self.prompt_len}, gen_len={self.gen_len}: both must be >= 1")

    @property
    def max_len(self) -> int:
        """Cache slots per sequence, s_max."""
        return self.prompt_len + self.gen_len

    @property
    def decode_steps(self) -> int:
        return self.gen_len - 1  # the first token comes from the prefill

    @property
    def mean_context(self) -> float:
        """Cached tokens at the mean decode step (step i, for token i = 2..n, sees s0 + i - 2)."""
        return self.prompt_len + max(self.gen_len - 2, 0) / 2


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


# ---------------------------------------------------------------- shapes and the placement rules


def layer_weight_tensors(model: ModelConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(checkpoint name, shape) of one decoder layer's parameters, in the module's parameter order:
    the order in which ``weight_shares`` applies FlexGen's midpoint rule."""
    h, q, kv, f = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    out: list[tuple[str, tuple[int, ...]]] = []

    def linear(name: str, n_in: int, n_out: int, bias: bool) -> None:
        out.append((f"{name}.weight", (n_out, n_in)))
        if bias:
            out.append((f"{name}.bias", (n_out,)))

    if model.arch is Arch.OPT:
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(f"self_attn.{proj}", h, h, model.linear_bias)
        norm = [("weight", (h,)), ("bias", (h,))] if model.layer_norm_affine else []
        out += [(f"self_attn_layer_norm.{name}", shape) for name, shape in norm]
        linear("fc1", h, f, model.linear_bias)
        linear("fc2", f, h, model.linear_bias)
        out += [(f"final_layer_norm.{name}", shape) for name, shape in norm]
        return tuple(out)
    for proj, n_in, n_out, bias in (
        ("q_proj", h, q, model.qkv_bias),
        ("k_proj", h, kv, model.qkv_bias),
        ("v_proj", h, kv, model.qkv_bias),
        ("o_proj", q, h, model.o_bias),
    ):
        linear(f"self_attn.{proj}", n_in, n_out, bias)
    for proj, n_in, n_out in (("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)):
        linear(f"mlp.{proj}", n_in, n_out, model.mlp_bias)
    return (*out, ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,)))


def resident_weight_elements(model: ModelConfig) -> int:
    """Parameters outside the decoder layers (embeddings, LM head, final norm): always on the GPU."""
    h, vocab = model.hidden_size, model.vocab_size
    if model.arch is Arch.OPT:
        proj = model.word_embed_proj_dim or h
        total = vocab * proj + (model.max_position + 2) * h  # tokens, learned positions (offset 2)
        total += 2 * proj * h if proj != h else 0  # project_in, project_out
        total += 2 * h if model.final_layer_norm and model.layer_norm_affine else 0
        return total + (0 if model.tie_word_embeddings else vocab * proj)
    return vocab * h + h + (0 if model.tie_word_embeddings else vocab * h)


def weight_shares(model: ModelConfig, placement: Placement) -> tuple[float, float, float]:
    """Byte shares of a layer on (GPU, CPU, disk) under the placement's rule (``Placement.weight_tiers``)."""
    sizes = [math.prod(shape) for _, shape in layer_weight_tensors(model)]
    per_tier = dict.fromkeys(Tier, 0)  # elements, summed as integers: the shares add up to 1
    for size, tier in zip(sizes, placement.weight_tiers(sizes)):
        per_tier[tier] += size
    total = sum(sizes)
    return per_tier[Tier.GPU] / total, per_tier[Tier.CPU] / total, per_tier[Tier.DISK] / total


def cache_slot_ranges(placement: Placement, max_len: int) -> tuple[int, int]:
    """(gpu_end, cpu_end): slots [0, gpu_end) on the GPU, [gpu_end, cpu_end) on the CPU, the rest on disk."""
    split = placement.cache_split(max_len)
    return split.gpu, split.gpu + split.cpu


# ---------------------------------------------------------------- the cost model, affine in the shares


# Placement shares: floats for ``estimate``, unit vectors over the LP's variables for the solver.
# w*/c*/a*: weights (bytes), cache (slots of s_max), activations, on GPU/CPU/disk; t*: tokens of the mean
# decode step (fractions of its context; tcx recomputed from X and tck copied as K,V, both on the CPU tier);
# p*: prompt tokens the prefill stores (fractions of s0); ``one`` carries the constant terms.
Shares = namedtuple("Shares", "wg wc wd cg cc cd ag ac ad tg tcx tck td pg pc pd one")


@dataclass(frozen=True)
class BlockCosts:
    """Everything about one block shape that does not depend on the placement (bytes, bytes/s, seconds)."""

    model: ModelConfig
    workload: ThroughputWorkload
    gpu_batch_size: int
    num_gpu_batches: int
    stores_x: bool
    layer_bytes: float
    resident_bytes: float
    kv_token_bytes: float  # K,V of one token, one layer, one sequence, as the CPU and disk tiers store it
    x_token_bytes: float  # X of one token, as stored
    gpu_kv_token_bytes: float  # K,V of one token in the model dtype: the GPU tier and the staging buffers
    stored_layer_bytes: float  # a layer's weights as the CPU and disk tiers store them (4-bit or not)
    act_prefill_bytes: float  # hidden states of the block between layers, [b, s0, h]
    act_decode_bytes: float  # [b, 1, h]
    gpu_working: Mapping[str, float]
    hidden_bytes: float = 0.0  # one token's hidden state in the model dtype (activations)
    # Times (``block_costs``); a block of sizes only (``block_sizes``) has none.
    rates: Mapping[str, float] = field(default_factory=dict)
    prefill_compute_s: float = 0.0  # per layer: the block's prompt GEMMs and attention
    decode_compute_s: float = 0.0  # per layer and step: decode GEMMs and attention, without recompute
    recompute_all_s: float = 0.0  # per layer and step: recompute K,V of every token of the mean context
    decode_all_s: float = (
        0.0  # per layer and step: decode the K,V codec's parts of the mean context (0: no codec or not measured)
    )
    head_s: float = 0.0  # per step (and once after the prefill): the block's LM head, after the last layer

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    @property
    def token_bytes(self) -> float:
        """Stored per token, layer and sequence: K,V, plus X when recomputation may run."""
        return self.kv_token_bytes + (self.x_token_bytes if self.stores_x else 0.0)

    @property
    def gpu_token_bytes(self) -> float:
        """Per token on the GPU tier: K,V in the model dtype (and X as counted on every tier)."""
        return self.gpu_kv_token_bytes + (self.x_token_bytes if self.stores_x else 0.0)


def block_sizes(
    model: ModelConfig,
    workload: ThroughputWorkload,
    gpu_batch_size: int,
    num_gpu_batches: int,
    stores_x: bool,
    dtype_bytes: int,
    codecs: CacheCodecs = NO_CODECS,
    compress_weight: bool = False,
) -> BlockCosts:
    """The block's sizes only, no times (no profile needed): all that ``memory_terms`` reads."""
    from kvpr.compress.weight_quant import encoded_ratio

    h, q, kv, e = model.hidden_size, model.q_size, model.kv_size, dtype_bytes
    gbs, s0, s_max = gpu_batch_size, workload.prompt_len, workload.max_len
    kv_bytes, x_bytes = codecs.kv_token_bytes(model, e), codecs.x_token_bytes(model, e)
    raw_kv = 2 * kv * e
    staging_bytes = raw_kv + (kv_bytes if kv_bytes != raw_kv else 0) + (x_bytes if stores_x else 0)
    shapes = [shape for _, shape in layer_weight_tensors(model)]
    layer_bytes = float(sum(math.prod(shape) for shape in shapes) * e)
    mlp_width = 3 * model.intermediate_size if model.arch is Arch.LLAMA else 2 * model.intermediate_size
    return BlockCosts(
        model=model,
        workload=workload,
        gpu_batch_size=gbs,
        num_gpu_batches=num_gpu_batches,
        stores_x=stores_x,
        layer_bytes=layer_bytes,
        resident_bytes=float(resident_weight_elements(model) * e),
        kv_token_bytes=float(kv_bytes),
        x_token_bytes=float(x_bytes),
        gpu_kv_token_bytes=float(raw_kv),
        stored_layer_bytes=layer_bytes * encoded_ratio(shapes, e) if compress_weight else layer_bytes,
        hidden_bytes=float(h * e),
        act_prefill_bytes=float(gbs * num_gpu_batches * s0 * h * e),
        act_decode_bytes=float(gbs * num_gpu_batches * h * e),
        gpu_working={
            # K,V (+X) of one (layer, GPU batch) for s_max tokens, double-buffered
            "cache staging": 2.0 * gbs * s_max * staging_bytes,
            # one GPU batch's prompt: hidden in/out, X, q/k/v, attention out, MLP, and the scores
            "prefill working": gbs * s0 * e * (3 * h + 2 * q + 2 * kv + mlp_width)
            + gbs * model.num_q_heads * s0 * s0 * e,
            "logits": 4.0 * gbs * model.vocab_size,  # [gbs, vocab] fp32
        },
    )


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


def memory_terms(b: BlockCosts, v: Shares) -> dict[Tier, dict[str, Any]]:
    """Bytes per tier and item (affine in the shares, like the times)."""
    n_layers, s_max, bs, tok = b.model.num_layers, b.workload.max_len, b.block_size, b.token_bytes
    stored_in, act_pre = b.stored_layer_bytes * (v.wc + v.wd), b.act_prefill_bytes
    cache = n_layers * bs * s_max * tok  # every slot of every layer, sequence, as stored off the GPU
    # the next layer's offloaded tensors, double-buffered; compressed: two encoded, one decoded
    compressed = b.stored_layer_bytes != b.layer_bytes
    buffers = 2 * stored_in + (b.layer_bytes * (v.wc + v.wd) if compressed else 0.0)
    return {
        Tier.GPU: {
            "resident weights": b.resident_bytes * v.one,
            "layer weights": n_layers * b.layer_bytes * v.wg,
            "kv cache": n_layers * bs * s_max * b.gpu_token_bytes * v.cg,
            "activations": act_pre * v.ag,
            "weight buffers": buffers,
            **{item: size * v.one for item, size in b.gpu_working.items()},
        },
        Tier.CPU: {
            "layer weights": n_layers * b.stored_layer_bytes * v.wc,
            "kv cache": cache * v.cc,
            "activations": act_pre * v.ac,
            # pinned staging of disk reads and writes, double-buffered: one layer's disk weights, one
            # (layer, GPU batch)'s disk cache, one GPU batch's activations
            "disk staging": 2 * (b.stored_layer_bytes * v.wd + cache / n_layers / b.num_gpu_batches * v.cd)
            + 2 * act_pre / b.num_gpu_batches * v.ad,
        },
        Tier.DISK: {
            "layer weights": n_layers * b.stored_layer_bytes * v.wd,
            "kv cache": cache * v.cd,
            "activations": act_pre * v.ad,
        },
    }


# ---------------------------------------------------------------- one fixed policy


def realised_shares(model: ModelConfig, placement: Placement, workload: ThroughputWorkload, r: float) -> Shares:
    """What the executor does with ``placement``: whole tensors, integer slot ranges, activations whole."""
    wg, wc, wd = weight_shares(model, placement)
    s_max, s0, mean = workload.max_len, workload.prompt_len, workload.mean_context
    gpu_end, cpu_end = cache_slot_ranges(placement, s_max)
    act = placement.activation_tier
    tg, tc = min(mean, gpu_end) / mean, (min(mean, cpu_end) - min(mean, gpu_end)) / mean
    pg, pc = min(s0, gpu_end) / s0, (min(s0, cpu_end) - min(s0, gpu_end)) / s0
    return Shares(
        wg, wc, wd,
        gpu_end / s_max, (cpu_end - gpu_end) / s_max, (s_max - cpu_end) / s_max,
        float(act is Tier.GPU), float(act is Tier.CPU), float(act is Tier.DISK),
        tg, r * tc, (1 - r) * tc, max(0.0, 1 - tg - tc),
        pg, pc, max(0.0, 1 - pg - pc),
        1.0,
    )  # fmt: skip


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
