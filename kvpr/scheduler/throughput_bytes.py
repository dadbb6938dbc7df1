"""Throughput mode's bytes: one block's weights, cache and activations per tier, affine in the shares.

The sizes half of the cost model (``throughput_cost`` adds the times): what a layer's weights, a
token's K,V and X and the residual stream weigh, where the placement's rules put them, and the bytes
each tier holds. No profile is needed, so a run checks its memory from the same formula the plan used.

- Compression (``--compress-weight``, ``--kv-codec int8|int4``, ``--x-codec``): the CPU and disk tiers
  hold, copy and write encoded bytes (``CacheCodecs``; weights at ``encoded_ratio`` of the model
  dtype), the GPU tier and GPU-resident weights stay in the model dtype.
- Weights follow FlexGen's midpoint rule per tensor (``weight_shares``); cache tiers are token ranges
  of the ``s_max`` slots (``cache_slot_ranges``); activations go whole to one tier (``realised_shares``).
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
from dataclasses import dataclass, field
from typing import Any

from kvpr.config import Arch, ModelConfig
from kvpr.errors import KvprError
from kvpr.throughput_config import Placement, Tier

GIB = float(1 << 30)


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


# ---------------------------------------------------------------- placement shares and memory, affine in the shares


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
