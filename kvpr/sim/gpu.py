"""The same operator and memory model on a measured GPU: kvpr's decode step on the H200, from the
rates ``kvpr profile`` measured there (no constant of the device lives in this file).

A layer of kvpr's overlapped executor (runtime/latency.py) is three queues, each summed over its work
(DESIGN.md section 2, plus the layer's own ops on the compute stream):

    copy stream     t_x(l) + t_kv(s - l)                 link bytes / H2D rate at the block size
    compute stream  t_x/c + t_rc + t_dec + linear + attn  recompute at the measured rate for its rows,
                                                          a K,V codec's decode at its measured rate,
                                                          every projection max(FLOPs / GEMM peak,
                                                          fp16 weights / HBM), attention's fp16 K,V / HBM
    host            ops issued x seconds per op          host.py, the ops counted by host_ops.py
    step = max(host over the step, sum of layers' max(copy, compute) + LM head)   (host.py overlapped_s)

``offloaded_layer`` is the executor the latency rows were measured on (commit 12ec21af: every host
token's K,V copied into an ``s_max`` staging buffer in one range per layer, decoded there in one call;
its ops cannot be counted on this checkout, so its layer and X chunk issue are the times its profile
measured, and only a K,V codec's and the step's own ops are counted);
``tiered_layer`` is the tiered one (docs/structure.md "One decode step, offloaded": the GPU tier attended
in place, host chunks through rings of slots, one piece each) in either version the tiered rows ran on:
a266ad4 (X slots hold a K,V slot's tokens) and 72448d7 (X slots of 32 MiB of X, ``x_slot_tokens_for``),
its host issue the ops of each part (``TieredOps``).

KVO's layers (runtime/kvo_cache.py, zero-copy gather): the selected rows cross PCIe inside a kernel on
the compute stream, then select/decode/attend read the workload's bytes (anchors, rows, recent window,
and each eager intermediate written and read back) from HBM; the host issues the KVO layer's counted ops.
transformers' offloaded cache copies each layer's K,V to the host and back on the compute stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvpr.config import ModelConfig
from kvpr.sim.host import HostCost, overlapped_s
from kvpr.sim.workload import DecodeStep, Op, Unit, VRows, decode_step

if TYPE_CHECKING:
    from kvpr.scheduler.cost_model import RateCurve
    from kvpr.scheduler.profile import HardwareProfile
    from kvpr.sim.host_ops import TieredOps


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
    x_codec: str = "none", kv_codec: str = "none", codec_host_s: float = 0.0,
) -> LayerTimes:  # fmt: skip
    """One layer of the overlapped executor at context ``s`` with ``l`` recomputed in ``c`` chunks; its
    host issue is the layer and X chunks as the profile timed them on that executor, plus a K,V
    codec's ops (``codec_host_s``: host_ops.kv_codec_ops at the per-op cost)."""
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
    host = p.host_issue(x_codec).seconds(rl, c) + codec_host_s
    return LayerTimes(t_x + t_kv, compute, host)


def step_ms(layers: list[LayerTimes], head_s: float, step_host_s: float) -> float:
    """A step of ``layers``: the device runs each layer's copy and compute streams side by side
    (their max) and the LM head; the host issues every layer and the step's own ops
    (``step_host_s``) without waiting for the device, so host and device overlap (host.py)."""
    device = sum(max(layer.copy_s, layer.compute_s) for layer in layers) + head_s
    return 1e3 * overlapped_s(sum(layer.host_s for layer in layers) + step_host_s, device)


def tiered_chunks(host_len: int, recompute_len: int, num_chunks: int, kv_slot: int, x_slot: int) -> tuple[int, int]:
    """(X chunks, K,V chunks) of a tiered layer: X of ``[0, l)`` in ``max(c, l / x_slot)``, K,V of
    ``[l, h)`` in slots of ``kv_slot`` tokens (runtime/latency.py ``_chunks``)."""
    x_chunks = max(num_chunks, -(-recompute_len // x_slot)) if recompute_len else 0
    return x_chunks, -(-(host_len - recompute_len) // kv_slot)


def tiered_layer(
    gpu: GpuMachine, model: ModelConfig, b: int, gpu_len: int, host_len: int, recompute_len: int, num_chunks: int,
    kv_slot_tokens: int, x_slot_tokens: int, host_s: float = 0.0,
) -> LayerTimes:  # fmt: skip
    """One layer of the tiered executor (runtime/latency.py): the GPU tier's ``gpu_len`` tokens
    attended in place; of the host tier's ``host_len``, X and K,V in ``tiered_chunks``, each chunk a
    ring slot and a piece; ``host_s``: its host issue (host.py)."""
    p, h = gpu.profile, model.hidden_size
    rl = recompute_len
    x_chunks, _ = tiered_chunks(host_len, rl, num_chunks, kv_slot_tokens, x_slot_tokens)
    x_bytes, kv_token = rl * b * h * 2, 2 * b * model.kv_size * 2
    t_x = gpu.h2d_s(x_bytes, x_bytes / x_chunks) if rl else 0.0
    t_kv = gpu.h2d_s((host_len - rl) * kv_token, kv_slot_tokens * kv_token)
    flops = 2.0 * b * rl * h * 2 * model.kv_size
    t_rc = gpu.rate_s(p.recompute_curve(), flops, b * rl / x_chunks) if rl else 0.0
    step = decode_step(model, model.model_type, b, gpu_len + host_len, "fp16", weight_bits=16)
    compute = (t_x / x_chunks if rl else 0.0) + t_rc + _layer_compute_s(gpu, step)
    return LayerTimes(t_x + t_kv, compute, host_s)


def kvpr_tiered_ms(
    gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, steps: list[tuple[int, int, int]],
    kv_slot_tokens: int, x_slot_tokens: int, ops: TieredOps, cost: HostCost, skip: int = 1,
) -> float:  # fmt: skip
    """Mean decode ms/token of the tiered executor; ``steps[k]`` = (host tokens, l, c) of decode step
    k, which runs with ``prompt_len + k`` cached tokens; the host issues ``ops.step`` at ``cost``."""
    times = []
    for k, (host_len, recompute_len, c) in enumerate(steps):
        if k < skip:
            continue
        gpu_len = prompt_len + k - host_len
        chunks = tiered_chunks(host_len, recompute_len, c, kv_slot_tokens, x_slot_tokens) if host_len else (0, 0)
        layer = tiered_layer(gpu, model, b, gpu_len, host_len, recompute_len, c, kv_slot_tokens, x_slot_tokens)
        host = cost.seconds(ops.step(model.num_layers, *chunks))
        times.append(step_ms([layer] * model.num_layers, lm_head_s(gpu, model, b), host))
    return sum(times) / len(times)


def lm_head_s(gpu: GpuMachine, model: ModelConfig, b: int) -> float:
    step = decode_step(model, model.model_type, b, 0, "fp16", weight_bits=16)
    return sum(gpu.linear_s(op) for op in step.head)


def kvpr_offloaded_ms(
    gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, splits: list[tuple[int, int]],
    x_codec: str = "none", kv_codec: str = "none", codec_host_s: float = 0.0, step_host_s: float = 0.0,
    skip: int = 1,
) -> float:  # fmt: skip
    """Mean decode ms/token over the steps after the first ``skip`` (as bench_latency times them);
    ``splits[k]`` = (l, c) of decode step k, which runs with ``prompt_len + k`` cached tokens."""
    times = []
    for k, (recompute_len, c) in enumerate(splits):
        if k < skip:
            continue
        layer = offloaded_layer(gpu, model, b, prompt_len + k, recompute_len, c, x_codec, kv_codec, codec_host_s)
        times.append(step_ms([layer] * model.num_layers, lm_head_s(gpu, model, b), step_host_s))
    return sum(times) / len(times)


def kvo_layer(gpu: GpuMachine, model: ModelConfig, b: int, s: int, host_s: float = 0.0) -> LayerTimes:
    """One KVO layer of the compressed executor with its rows in pinned host memory (zero-copy)."""
    step = decode_step(model, model.model_type, b, s, "kvo", None, weight_bits=16, v_rows=VRows.PER_CHUNK)
    group = step.layers[-1]
    link = step.kv_link_bytes / group.count
    hbm = sum(op.kv_bytes + 2 * op.inter_bytes for op in group.ops if op.unit is Unit.ATTENTION) - link
    linear = sum(gpu.linear_s(op) for op in group.ops if op.unit is Unit.MATRIX)
    compute = gpu.h2d_s(link) + hbm / gpu.hbm_bytes_per_s + linear
    return LayerTimes(0.0, compute, host_s)


def kvpr_kvo_ms(
    gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, steps: int, ops: tuple[int, int, int],
    cost: HostCost, skip: int = 1,
) -> float:  # fmt: skip
    """Mean decode ms/token of ``--kv-codec kvo --offload cpu --compile``: dense first layers on the
    device; ``ops`` = host ops of a KVO layer, a dense layer and the step (host_ops.kvo_layer_ops)."""
    from kvpr.compress.kvo_config import KVOConfig

    kvo_ops, dense_ops, step_ops = ops
    dense_layers = min(KVOConfig().uncompressed_layers, model.num_layers)
    times = []
    for k in range(skip, steps):
        s = prompt_len + k
        dense_step = decode_step(model, model.model_type, b, s, "fp16", weight_bits=16)
        dense = LayerTimes(0.0, _layer_compute_s(gpu, dense_step), cost.seconds(dense_ops))
        kvo = kvo_layer(gpu, model, b, s, cost.seconds(kvo_ops))
        layers = [dense] * dense_layers + [kvo] * (model.num_layers - dense_layers)
        times.append(step_ms(layers, lm_head_s(gpu, model, b), cost.seconds(step_ops)))
    return sum(times) / len(times)


def hf_ms(
    gpu: GpuMachine, model: ModelConfig, b: int, prompt_len: int, steps: int, offloaded: bool,
    host_ops: tuple[int, int] | None, cost: HostCost, skip: int = 1,
) -> float:  # fmt: skip
    """transformers' decode: its DynamicCache concatenates each layer's K,V every step (read and
    written once more); offloaded, the layer's K,V go to the host and back on the compute stream.
    ``host_ops`` = its (layer, step) ops counted by host_ops.hf_layer_ops (None: not counted)."""
    layer_ops, step_ops = host_ops or (0, 0)
    times = []
    for k in range(skip, steps):
        s = prompt_len + k
        step = decode_step(model, model.model_type, b, s, "fp16", weight_bits=16)
        kv = step.kv_read_bytes / model.num_layers
        compute = _layer_compute_s(gpu, step) + 2 * kv / gpu.hbm_bytes_per_s  # attention + the cat's copy
        if offloaded:
            compute += gpu.h2d_s(kv) + kv / gpu.profile.d2h.rate(kv)
        layer = LayerTimes(0.0, compute, cost.seconds(layer_ops))
        times.append(step_ms([layer] * model.num_layers, lm_head_s(gpu, model, b), cost.seconds(step_ops)))
    return sum(times) / len(times)
