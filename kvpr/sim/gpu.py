"""The same operator and memory model on a measured GPU: kvpr's decode step on the H200, from the
rates ``kvpr profile`` measured there (no constant of the device lives in this file).

A layer of kvpr's overlapped executor (runtime/latency.py) is three queues, each summed over its work
(DESIGN.md section 2, plus the layer's own ops on the compute stream):

    copy stream     t_x(l) + t_kv(s - l)                 link bytes / H2D rate at the block size
    compute stream  t_x/c + t_rc + t_dec + linear + attn  recompute at the measured rate for its rows,
                                                          a K,V codec's decode at its measured rate,
                                                          every projection max(FLOPs / GEMM peak,
                                                          fp16 weights / HBM), attention's fp16 K,V / HBM
    host            h_layer + c * h_chunk + h_kv          measured issue times; h_kv: a K,V codec's
                                                          encode and decode, derived from the X codec's
    layer = max(copy, compute, host);  step = layers + LM head

``offloaded_layer`` is the executor the latency rows were measured on (commit 12ec21af: every host
token's K,V copied into an ``s_max`` staging buffer in one range per layer, decoded there in one call);
``tiered_layer`` is the tiered one (docs/structure.md "One decode step, offloaded": the GPU tier attended
in place, host chunks through rings of slots, one piece each) in either version the tiered rows ran on:
a266ad4 (X slots hold a K,V slot's tokens) and 72448d7 (X slots of 32 MiB of X, ``x_slot_tokens_for``),
its host issue by part (``TieredIssue``).

KVO's layers (runtime/kvo_cache.py, zero-copy gather): the selected rows cross PCIe inside a kernel on
the compute stream, then select/decode/attend read the workload's bytes (anchors, rows, recent window,
and each eager intermediate written and read back) from HBM; the host issue is the dense layer's.
transformers' offloaded cache copies each layer's K,V to the host and back on the compute stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvpr.config import ModelConfig
from kvpr.sim.workload import DecodeStep, Op, Unit, VRows, decode_step

if TYPE_CHECKING:
    from kvpr.scheduler.cost_model import RateCurve
    from kvpr.scheduler.profile import HardwareProfile


@dataclass(frozen=True)
class GpuMachine:
    """One GPU's measured rates: ``profile`` for the model's shape and batch, ``device_profile`` for
    the device-wide rates a format-3 profile lacks (device memory)."""

    profile: HardwareProfile
    hbm_bytes_per_s: float
    sources: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path, device_path: str | Path | None = None) -> GpuMachine:
        from kvpr.scheduler.profile import HardwareProfile

        profile = HardwareProfile.load(path)
        hbm = profile.hbm_bytes_per_s()
        sources = [Path(path).name]
        if hbm is None:
            if device_path is None:
                raise ValueError(f"{path} has no device-memory rate: give a profile of the same device that has one")
            hbm = HardwareProfile.load(device_path).hbm_bytes_per_s()
            sources.append(Path(device_path).name)
        assert hbm is not None
        return cls(profile, hbm, tuple(sources))

    @property
    def gemm_peak(self) -> float:
        return self.profile.gemm.peak

    def h2d_s(self, nbytes: float, block: float | None = None) -> float:
        return nbytes / self.profile.h2d.rate(block or nbytes) if nbytes > 0 else 0.0

    def linear_s(self, op: Op) -> float:
        return max(2 * op.macs / self.gemm_peak, op.weight_bytes / self.hbm_bytes_per_s)

    def rate_s(self, curve: RateCurve, work: float, size: float) -> float:
        return work / curve.rate(size) if work > 0 else 0.0


@dataclass(frozen=True)
class LayerTimes:
    copy_s: float
    compute_s: float
    host_s: float

    @property
    def seconds(self) -> float:
        return max(self.copy_s, self.compute_s, self.host_s)


def _layer_compute_s(gpu: GpuMachine, step: DecodeStep) -> float:
    """The projections and the MLP of one layer plus attention over the fp16 staging buffer."""
    ops = step.layers[0].ops
    linear = sum(gpu.linear_s(op) for op in ops if op.unit is Unit.MATRIX)
    return linear + step.kv_read_bytes / step.layers[0].count / gpu.hbm_bytes_per_s


def offloaded_layer(
    gpu: GpuMachine, model: ModelConfig, b: int, s: int, recompute_len: int, num_chunks: int,
    x_codec: str = "none", kv_codec: str = "none",
) -> LayerTimes:  # fmt: skip
    """One layer of the overlapped executor at context ``s`` with ``l`` recomputed in ``c`` chunks."""
    from kvpr.cache.codec import make_x_codec
    from kvpr.sim.workload import dense_kv_bytes_per_token

    p, h = gpu.profile, model.hidden_size
    rl, c = recompute_len, max(1, min(num_chunks, recompute_len)) if recompute_len else 1
    xc = make_x_codec(x_codec, h)
    x_bytes = rl * (b * h * 2 if xc is None else xc.bytes_per_token(b, h))
    kv_stored = (s - rl) * dense_kv_bytes_per_token("fp16" if kv_codec == "none" else kv_codec, b, model.num_kv_heads,
                                                   model.head_dim)  # fmt: skip
    t_x = gpu.h2d_s(x_bytes, x_bytes / c)
    t_kv = gpu.h2d_s(kv_stored)
    flops = 2.0 * b * rl * h * 2 * model.kv_size
    t_rc = gpu.rate_s(p.recompute_curve(x_codec), flops, b * rl / c)
    decode = p.kv_decode.get(kv_codec)
    t_dec = gpu.rate_s(decode, kv_stored, kv_stored) if decode is not None and kv_stored else 0.0
    step = decode_step(model, model.model_type, b, s, "fp16", weight_bits=16)
    compute = t_x / c + t_rc + t_dec + _layer_compute_s(gpu, step)
    host = p.host_issue(x_codec).seconds(rl, c) + kv_codec_host_s(p, kv_codec)
    return LayerTimes(t_x + t_kv, compute, host)


def kv_codec_host_s(profile: HardwareProfile, kv_codec: str, decodes: int = 1) -> float:
    """Host seconds a tokenwise K,V codec adds to a layer: the new token's K and V encoded and stored
    as codes, scale and zero (six D2H copies, not two), and ``decodes`` landed ranges decoded (six
    H2D copies, not two). ``kvpr profile`` times the same group-quantisation calls for X alone: its
    ``host_layer_s[codec] - host_layer_s["none"]`` is one encode and two extra copies, its
    ``host_chunk_s[codec] - host_chunk_s["none"]`` one decode and two extra copies; K and V are two
    of each (compress/quant.py ``GroupQuantCodec`` calls ``quantize_groups`` / ``dequantize_groups``
    once per part, as ``GroupQuantInputs`` does for X). 0 without a codec or its X timing."""
    layer, chunk = profile.host_layer_s, profile.host_chunk_s
    if kv_codec == "none" or kv_codec not in layer or kv_codec not in chunk:
        return 0.0
    encode = max(0.0, layer[kv_codec] - layer.get("none", 0.0))
    decode = max(0.0, chunk[kv_codec] - chunk.get("none", 0.0))
    return 2 * encode + 2 * decodes * decode


@dataclass(frozen=True)
class TieredIssue:
    """Host seconds of one layer of the tiered executor, by what it issues: ``gpu_layer_s`` with every
    token in the GPU tier (one attention), else ``layer_s`` (the layer, its GPU-tier piece and the
    merge) plus ``x_chunk_s`` per X chunk and ``kv_chunk_s`` per K,V chunk (a ring slot and a piece)."""

    gpu_layer_s: float
    layer_s: float
    x_chunk_s: float
    kv_chunk_s: float

    def seconds(self, x_chunks: int, kv_chunks: int) -> float:
        if not x_chunks and not kv_chunks:
            return self.gpu_layer_s
        return self.layer_s + x_chunks * self.x_chunk_s + kv_chunks * self.kv_chunk_s


def host_tier_issue(profile: HardwareProfile, gpu_layer_s: float) -> TieredIssue:
    """The tiered executor's issue from a format-5 profile, whose probe puts its 16-token prompt on
    the host tier: ``host_layer_s`` is a layer at ``l = 0`` (one K,V chunk of 16 tokens), and
    ``host_chunk_s`` one X chunk more. No probe times a K,V chunk alone: it is costed as an X chunk
    (the same slot wait, copy, piece and release; a recompute's launches fewer, a second copy more),
    and taken out of the layer once. No probe times a layer without a host tier: ``gpu_layer_s``."""
    chunk = profile.host_chunk_s["none"]
    return TieredIssue(gpu_layer_s, profile.host_layer_s["none"] - chunk, chunk, chunk)


def tiered_layer(
    gpu: GpuMachine, model: ModelConfig, b: int, gpu_len: int, host_len: int, recompute_len: int, num_chunks: int,
    kv_slot_tokens: int, x_slot_tokens: int, issue: TieredIssue,
) -> LayerTimes:  # fmt: skip
    """One layer of the tiered executor (runtime/latency.py): the GPU tier's ``gpu_len`` tokens
    attended in place; of the host tier's ``host_len``, X of ``[0, l)`` in ``max(c, l / x_slot)``
    chunks, then K,V in chunks of ``kv_slot_tokens``, each chunk a ring slot and a piece; the host
    issues them at ``issue``'s costs."""
    p, h = gpu.profile, model.hidden_size
    rl = recompute_len
    x_chunks = max(num_chunks, -(-rl // x_slot_tokens)) if rl else 0
    kv_chunks = -(-(host_len - rl) // kv_slot_tokens)
    x_bytes, kv_token = rl * b * h * 2, 2 * b * model.kv_size * 2
    t_x = gpu.h2d_s(x_bytes, x_bytes / x_chunks) if rl else 0.0
    t_kv = gpu.h2d_s((host_len - rl) * kv_token, kv_slot_tokens * kv_token)
    flops = 2.0 * b * rl * h * 2 * model.kv_size
    t_rc = gpu.rate_s(p.recompute_curve(), flops, b * rl / x_chunks) if rl else 0.0
    step = decode_step(model, model.model_type, b, gpu_len + host_len, "fp16", weight_bits=16)
    compute = (t_x / x_chunks if rl else 0.0) + t_rc + _layer_compute_s(gpu, step)
    return LayerTimes(t_x + t_kv, compute, issue.seconds(x_chunks, kv_chunks))


def kvpr_tiered_ms(
    gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, steps: list[tuple[int, int, int]],
    kv_slot_tokens: int, x_slot_tokens: int, issue: TieredIssue, skip: int = 1,
) -> float:  # fmt: skip
    """Mean decode ms/token of the tiered executor; ``steps[k]`` = (host tokens, l, c) of decode step
    k, which runs with ``prompt_len + k`` cached tokens."""
    times = []
    for k, (host_len, recompute_len, c) in enumerate(steps):
        if k < skip:
            continue
        gpu_len = prompt_len + k - host_len
        layer = tiered_layer(gpu, model, b, gpu_len, host_len, recompute_len, c, kv_slot_tokens, x_slot_tokens, issue)
        times.append(model.num_layers * layer.seconds + lm_head_s(gpu, model, b))
    return 1e3 * sum(times) / len(times)


def lm_head_s(gpu: GpuMachine, model: ModelConfig, b: int) -> float:
    step = decode_step(model, model.model_type, b, 0, "fp16", weight_bits=16)
    return sum(gpu.linear_s(op) for op in step.head)


def kvpr_offloaded_ms(
    gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, splits: list[tuple[int, int]],
    x_codec: str = "none", kv_codec: str = "none", skip: int = 1,
) -> float:  # fmt: skip
    """Mean decode ms/token over the steps after the first ``skip`` (as bench_latency times them);
    ``splits[k]`` = (l, c) of decode step k, which runs with ``prompt_len + k`` cached tokens."""
    times = []
    for k, (recompute_len, c) in enumerate(splits):
        if k < skip:
            continue
        layer = offloaded_layer(gpu, model, b, prompt_len + k, recompute_len, c, x_codec, kv_codec)
        times.append(model.num_layers * layer.seconds + lm_head_s(gpu, model, b))
    return 1e3 * sum(times) / len(times)


def kvo_layer(gpu: GpuMachine, model: ModelConfig, b: int, s: int, kvo_config: object | None = None) -> LayerTimes:
    """One KVO layer of the compressed executor with its rows in pinned host memory (zero-copy)."""
    step = decode_step(model, model.model_type, b, s, "kvo", kvo_config, weight_bits=16, v_rows=VRows.PER_CHUNK)
    group = step.layers[-1]
    link = step.kv_link_bytes / group.count
    hbm = sum(op.kv_bytes + 2 * op.inter_bytes for op in group.ops if op.unit is Unit.ATTENTION) - link
    linear = sum(gpu.linear_s(op) for op in group.ops if op.unit is Unit.MATRIX)
    compute = gpu.h2d_s(link) + hbm / gpu.hbm_bytes_per_s + linear
    return LayerTimes(0.0, compute, gpu.profile.host_issue().seconds(0, 1))


def kvpr_kvo_ms(gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, steps: int, skip: int = 1) -> float:
    """Mean decode ms/token of ``--kv-codec kvo --offload cpu``: dense first layers on the device."""
    from kvpr.compress.kvo import KVOConfig

    dense_layers = min(KVOConfig().uncompressed_layers, model.num_layers)
    times = []
    for k in range(skip, steps):
        s = prompt_len + k
        dense = decode_step(model, model.model_type, b, s, "fp16", weight_bits=16)
        dense_s = max(_layer_compute_s(gpu, dense), gpu.profile.host_issue().seconds(0, 1))
        kvo = kvo_layer(gpu, model, b, s).seconds
        times.append(dense_layers * dense_s + (model.num_layers - dense_layers) * kvo + lm_head_s(gpu, model, b))
    return 1e3 * sum(times) / len(times)


def hf_ms(gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, steps: int, offloaded: bool,
          skip: int = 1) -> float:  # fmt: skip
    """transformers' decode: its DynamicCache concatenates each layer's K,V every step (read and
    written once more); offloaded, the layer's K,V go to the host and back on the compute stream.
    Its host issue is not modelled: kvpr's profile does not time transformers' Python."""
    times = []
    for k in range(skip, steps):
        s = prompt_len + k
        step = decode_step(model, model.model_type, b, s, "fp16", weight_bits=16)
        kv = step.kv_read_bytes / model.num_layers
        layer = _layer_compute_s(gpu, step) + 2 * kv / gpu.hbm_bytes_per_s  # attention + the cat's copy
        if offloaded:
            layer += gpu.h2d_s(kv) + kv / gpu.profile.d2h.rate(kv)
        times.append(model.num_layers * layer + lm_head_s(gpu, model, b))
    return 1e3 * sum(times) / len(times)
