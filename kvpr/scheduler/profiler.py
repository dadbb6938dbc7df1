"""Measures the rates the cost model needs on this machine; profile.py holds what is kept.

CUDA: pinned copies and GEMMs timed with events. On a CPU-only machine the same quantities are
measured on tiny sizes (memcpy, CPU matmul) so CI exercises every path in < 3 s.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kvpr.config import Arch, ModelConfig
from kvpr.device import dtype_name, element_size
from kvpr.errors import KvprError
from kvpr.scheduler.cost_model import RateCurve
from kvpr.scheduler.profile import (
    PROFILE_FORMAT_VERSION,
    HardwareProfile,
    default_profile_path,
    device_name,
    profile_shape,
)
from kvpr.scheduler.profiler_timing import MIB, Clock, Ladder, Progress, ladder_points, measurement_ladder, timer

COPY_REPEATS = 3  # H2D and device-memory points are each timed this many times, interleaved


def measure_profile(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, batch_size: int, progress: bool = False
) -> HardwareProfile:
    """Measure H2D/D2H copy bandwidth, the recompute GEMM rate, decode attention and layer GEMM times."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise KvprError(f"cannot profile device {device}: kvpr profiles cuda and cpu devices")
    ladder = measurement_ladder(device, model, dtype, batch_size)
    clock = timer(device, ladder.min_time_s)
    with Progress(progress) as bar, torch.inference_mode():
        h2d, d2h, h2d_samples = _measure_copies(device, ladder, clock, bar)
        d2d, hbm_read = _measure_device_memory(device, ladder, clock, bar)
        gemm = _measure_recompute(device, model, dtype, ladder, clock, bar)
        bar.phase("decode attention and layer", len(ladder.attention_lens) + 1)
        attention = ladder_points(
            ladder.attention_lens,
            ladder.phase_budget_s,
            lambda s: clock(_attention_call(model, dtype, device, batch_size, s)),
            bar,
        )
        layer = _layer_gemms(model, dtype, device, batch_size, ladder.layer_weight_bytes)
        decode_layer_s = clock(layer) if layer is not None else None
        bar.advance()
        host_layer_s, host_chunk_s, host_kv_chunk_s = _measure_host_issue(device, model, dtype, bar)
        kv_decode = _measure_kv_decode(device, model, dtype, ladder, clock, bar)
    return HardwareProfile(
        device_name=device_name(device),
        torch_version=str(torch.__version__),
        h2d=RateCurve.from_points(h2d),
        d2h=RateCurve.from_points(d2h),
        gemm=RateCurve.from_points(gemm.pop("none")),
        gemm_hidden=model.hidden_size,
        gemm_kv_width=2 * model.kv_size,
        gemm_arch=model.arch.value,
        x_codec_gemm={name: RateCurve.from_points(points) for name, points in gemm.items()},
        dtype=dtype_name(dtype),
        batch_size=batch_size,
        attention=tuple(attention),
        decode_layer_s=decode_layer_s,
        host_layer_s=host_layer_s,
        host_chunk_s=host_chunk_s,
        host_kv_chunk_s=host_kv_chunk_s,
        kv_decode={name: RateCurve.from_points(points) for name, points in kv_decode.items()},
        h2d_samples={name: tuple(points) for name, points in h2d_samples.items()},
        d2d=RateCurve.from_points(d2d),
        hbm_read=RateCurve.from_points(hbm_read),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _measure_copies(
    device: torch.device, ladder: Ladder, clock: Clock, bar: Progress
) -> tuple[list[tuple[int, float]], list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(bytes, bytes/s) both ways: pinned host <-> device on CUDA, plain memcpy between host tensors on CPU.

    H2D is timed ``COPY_REPEATS`` times per size, interleaved, from torch's pinned memory (the curve:
    per-size medians) and, on CUDA, from memory pinned by ``cudaHostRegister`` as the runtime's host
    tier is, one copy at a time and streamed (``_streamed_h2d``); every repetition is kept, so a
    floor can take the best the link ever did.
    """
    from kvpr.device import host_empty

    largest = max(ladder.copy_bytes)
    cuda = device.type == "cuda"
    hosts = {"pinned": torch.empty(largest, dtype=torch.uint8, pin_memory=cuda).fill_(1)}
    if cuda:
        hosts["registered"] = host_empty((largest,), torch.uint8, pin=True).fill_(1)
    dev = torch.empty(largest, dtype=torch.uint8, device=device).fill_(1)

    def rate(src: torch.Tensor, dst: torch.Tensor) -> float:
        # non_blocking from/to pinned memory: the copy is queued on the current stream, timed by events
        return src.numel() / clock(lambda: dst.copy_(src, non_blocking=True))

    bar.phase("host -> device copies", len(ladder.copy_bytes) * COPY_REPEATS)
    samples: dict[str, list[tuple[int, float]]] = {name: [] for name in hosts}
    began = time.perf_counter()
    for _ in range(COPY_REPEATS):
        for size in ladder.copy_bytes:
            for name, host in hosts.items():
                samples[name].append((size, rate(host[:size], dev[:size])))
            bar.advance()
            if time.perf_counter() - began > ladder.phase_budget_s:
                break
    if cuda:  # the ring's pattern: slot-sized copies queued back to back, timed as one
        samples["streamed"] = _streamed_h2d(hosts["registered"], dev, clock)
    measured = sorted({size for size, _ in samples["pinned"]})
    h2d = [(n, statistics.median(r for size, r in samples["pinned"] if size == n)) for n in measured]
    bar.phase("device -> host copies", len(ladder.copy_bytes))
    pinned = hosts["pinned"]
    d2h = ladder_points(ladder.copy_bytes, ladder.phase_budget_s, lambda n: rate(dev[:n], pinned[:n]), bar)
    return h2d, d2h, samples


def _streamed_h2d(host: torch.Tensor, dev: torch.Tensor, clock: Clock) -> list[tuple[int, float]]:
    """(bytes, bytes/s) of ``SLOT_BYTES`` copies from registered memory queued back to back, as the
    overlapped executor's rings issue them, ``COPY_REPEATS`` times: one copy at a time leaves the
    link idle between copies, so the single-copy probe reads a few percent under what the rings
    move, and a floor from it would sit under the runs it bounds."""
    from kvpr.runtime.latency import SLOT_BYTES

    total = min(host.numel(), dev.numel()) // SLOT_BYTES * SLOT_BYTES
    if total < 2 * SLOT_BYTES:
        return []
    starts = range(0, total, SLOT_BYTES)

    def queue() -> None:
        for start in starts:
            dev[start : start + SLOT_BYTES].copy_(host[start : start + SLOT_BYTES], non_blocking=True)

    return [(total, total / clock(queue)) for _ in range(COPY_REPEATS)]


def _measure_device_memory(
    device: torch.device, ladder: Ladder, clock: Clock, bar: Progress
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(bytes, bytes/s) of device-to-device copies and of a read-only reduction (max), at sizes beyond
    the L2 cache (256 MiB to 1 GiB on CUDA, as free memory allows), best of ``COPY_REPEATS`` per size:
    what the decode's weight and K,V reads can reach at most."""
    if device.type == "cuda":
        sizes = tuple(n for n in (256 * MIB, 512 * MIB, 1024 * MIB) if 2 * n <= ladder.layer_weight_bytes)
        sizes = sizes or (min(ladder.copy_bytes[-1], 256 * MIB),)
    else:
        sizes = ladder.copy_bytes
    src = torch.empty(max(sizes) // 2, dtype=torch.float16, device=device).fill_(1)  # fp16: 2 bytes each
    dst = torch.empty_like(src)
    copies: dict[int, float] = {}
    reads: dict[int, float] = {}
    bar.phase("device memory: copies and reads", len(sizes) * COPY_REPEATS)
    for _ in range(COPY_REPEATS):
        for size in sizes:
            n = size // 2
            copies[size] = max(copies.get(size, 0.0), size / clock(lambda n=n: dst[:n].copy_(src[:n])))
            reads[size] = max(reads.get(size, 0.0), size / clock(lambda n=n: torch.amax(src[:n])))
            bar.advance()
    return sorted(copies.items()), sorted(reads.items())


def _measure_recompute(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, ladder: Ladder, clock: Clock, bar: Progress
) -> dict[str, list[tuple[int, float]]]:
    """(M rows, FLOP/s) of recomputing K,V of M rows as the runtime does, per X codec ("none":
    X in the model dtype): decode X, the K and V projections with their biases, RoPE on K, written
    into the staging layout. FLOP/s counts the GEMMs' FLOPs only, so the rest shows as a lower rate."""
    from kvpr.cache.codec import X_CODEC_NAMES, make_x_codec
    from kvpr.models.loader import build_model, init_dummy_weights

    one_layer = build_model(replace(model, num_layers=1, vocab_size=256))  # a real layer of this architecture
    init_dummy_weights(one_layer, device, dtype, seed=0)
    layer = one_layer.decoder_layers[0]
    top = max(ladder.gemm_rows)
    x = _filled((top, 1, model.hidden_size), dtype, device)  # [M, b=1, h]: rows are tokens
    k_out = torch.empty(top, 1, model.num_kv_heads, model.head_dim, dtype=dtype, device=device)  # [M, 1, n_kv, d]
    v_out = torch.empty_like(k_out)
    positions = torch.arange(top, device=device)[:, None]  # [M, 1]
    rope = one_layer.rope(positions, dtype)  # cos, sin [M, 1, 1, d], or None
    flops_per_row = 2.0 * model.hidden_size * 2 * model.kv_size

    def recompute(rows: int, codec: Any, parts: dict[str, torch.Tensor]) -> Callable[[], None]:
        chunk_rope = None if rope is None else (rope[0][:rows], rope[1][:rows])

        def run() -> None:
            chunk = x[:rows] if codec is None else codec.decode({n: t[:rows] for n, t in parts.items()}, dtype)
            layer.kv_into(chunk, chunk_rope, k_out[:rows], v_out[:rows])

        return run

    curves: dict[str, list[tuple[int, float]]] = {}
    for name in X_CODEC_NAMES:
        codec = make_x_codec(name, model.hidden_size)
        parts = {} if codec is None else codec.encode(x)
        bar.phase(f"recompute, X {name if codec else 'in ' + dtype_name(dtype)}", len(ladder.gemm_rows))
        curves[name] = ladder_points(
            ladder.gemm_rows,
            ladder.phase_budget_s,
            lambda rows, codec=codec, parts=parts: rows * flops_per_row / clock(recompute(rows, codec, parts)),
            bar,
        )
    return curves


def _measure_host_issue(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, bar: Progress
) -> tuple[dict[str, float], dict[str, float], float]:
    """Host seconds to issue one decode layer without X chunks, one X chunk more (per X codec) and
    one K,V chunk more, timed on the overlapped executor itself (CUDA only: on a CPU the host is
    the device)."""
    if device.type != "cuda":
        return {}, {}, 0.0
    return host_issue_times(device, model, dtype, bar)


def host_issue_times(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, bar: Progress, rounds: int = 15
) -> tuple[dict[str, float], dict[str, float], float]:
    """The measurement behind ``_measure_host_issue`` (runs on any device, for tests).

    Each decode call is timed on the host alone, at batch 1 and a 16-token context, where the GPU
    finishes a step well before the host has issued the next, so the call never waits: what is
    timed is Python, dispatch and launches, with the allocator in its steady state as in a run.
    Five executors take turns every round, so drift (clocks, other processes) hits them alike:
    a 2- and a 1-layer model without recompute (their difference is one layer, the embedding and
    logits cancel; the 16 host tokens are one K,V chunk), a 1-layer model alternating 1 and 16 X
    chunks (a chunk is 1/15 of that difference) and a 1-layer model copying the 16 tokens' K,V as 16
    chunks of one token (a K,V chunk is 1/15 of its difference from the first). Medians over
    ``rounds`` rounds; the K,V chunk with X in the model dtype (its cost does not depend on X).
    """
    from kvpr.cache.codec import X_CODEC_NAMES, make_x_codec
    from kvpr.cache.storage import CacheShape, KVStorage
    from kvpr.models.loader import build_model, init_dummy_weights
    from kvpr.runtime.latency import OverlappedExecutor
    from kvpr.runtime.tiers import TierPlan
    from kvpr.scheduler.plan import StepSplit

    prompt, few, many, warm = 16, 1, 16, 4
    configs = {layers: replace(model, num_layers=layers, vocab_size=256) for layers in (1, 2)}
    models = {layers: build_model(config) for layers, config in configs.items()}
    for built in models.values():
        init_dummy_weights(built, device, dtype, seed=0)
    ids = torch.zeros(1, prompt, dtype=torch.long, device=device)

    def executor(
        layers: int, x_codec: str, split: Callable[[int], StepSplit], steps: int, slot_tokens: int | None = None
    ) -> OverlappedExecutor:
        shape = CacheShape.for_model(configs[layers], 1, prompt + steps, dtype)
        codec = make_x_codec(x_codec, model.hidden_size)
        storage = KVStorage(shape, torch.device("cpu"), pin=device.type == "cuda", store_inputs=True, x_codec=codec)
        # No GPU prefix: the prompt lies on the host tier, so the chunked steps really recompute it.
        plan = TierPlan.for_capacity(0, shape.max_len)
        built = OverlappedExecutor(models[layers], storage, device, True, split, plan, slot_tokens)
        built.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        return built

    def host_s(run: OverlappedExecutor) -> float:
        begin = time.perf_counter()
        run.decode(ids[:, 0])
        return time.perf_counter() - begin

    bar.phase("host issue per layer, X chunk and K,V chunk", len(X_CODEC_NAMES))
    layer_s, chunk_s, kv_chunk_s = {}, {}, 0.0
    for name in X_CODEC_NAMES:
        counts = itertools.cycle((few, many))  # the chunked executor's steps alternate
        one = executor(1, name, lambda _: StepSplit(0), warm + rounds)
        two = executor(2, name, lambda _: StepSplit(0), warm + rounds)
        chunked = executor(1, name, lambda _, counts=counts: StepSplit(prompt, next(counts)), 2 * (warm + rounds))
        runs = {"one": one, "two": two, "few": chunked, "many": chunked}
        if name == "none":  # the K,V chunks: 16 of one token against the one of 16
            runs["kv_many"] = executor(1, name, lambda _: StepSplit(0), warm + rounds, slot_tokens=1)
        samples: dict[str, list[float]] = {key: [] for key in runs}
        for round_index in range(warm + rounds):
            times = {key: host_s(run) for key, run in runs.items()}  # in order: "few" before "many"
            if round_index >= warm:  # allocator, kernel choice and caches settle in the first rounds
                for key, value in times.items():
                    samples[key].append(value)
        for run in runs.values():
            run.finish()
        median = {key: statistics.median(values) for key, values in samples.items()}
        layer_s[name] = max(0.0, median["two"] - median["one"])
        chunk_s[name] = max(0.0, (median["many"] - median["few"]) / (many - few))
        if "kv_many" in median:
            kv_chunk_s = max(0.0, (median["kv_many"] - median["one"]) / (prompt - 1))
        bar.advance()
    return layer_s, chunk_s, kv_chunk_s


def _measure_kv_decode(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, ladder: Ladder, clock: Clock, bar: Progress
) -> dict[str, list[tuple[int, float]]]:
    """(stored bytes, bytes/s) of decoding the host tier's int8/int4 K,V parts of M token rows into
    the staging buffers, as the runtime does once they land (CUDA only: on a CPU nothing overlaps,
    so the split does not hinge on it)."""
    if device.type != "cuda":
        return {}
    from kvpr.cache.codec import EncodedKV
    from kvpr.cache.storage import tier_codec
    from kvpr.runtime.latency import decode_kv_into

    top = max(ladder.gemm_rows)
    shape = (top, 1, model.num_kv_heads, model.head_dim)  # [M, b=1, n_kv, d]: rows are tokens
    k, v = _filled(shape, dtype, device), _filled(shape, dtype, device)
    k_out, v_out = torch.empty_like(k), torch.empty_like(v)
    curves: dict[str, list[tuple[int, float]]] = {}
    for name in ("int8", "int4"):
        codec = tier_codec(name, model.head_dim)
        assert codec is not None
        parts = codec.encode(k, v).tensors
        row_bytes = sum(t.element_size() * t[0].numel() for t in parts.values())  # stored bytes per row

        def decode(rows: int, codec: Any = codec, parts: dict[str, torch.Tensor] = parts) -> Callable[[], None]:
            encoded = EncodedKV(codec.name, (rows, *shape[1:]), {n: t[:rows] for n, t in parts.items()})
            return lambda: decode_kv_into(codec, encoded, dtype, k_out, v_out, 0)

        bar.phase(f"K,V decode, --kv-codec {name}", len(ladder.gemm_rows))
        curves[name] = [
            (rows * row_bytes, rows * row_bytes / seconds)
            for rows, seconds in ladder_points(
                ladder.gemm_rows, ladder.phase_budget_s, lambda rows: clock(decode(rows)), bar
            )
        ]
    return curves


def _filled(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random on CUDA (realistic power draw); a constant on CPU (randn of big weights is slow)."""
    if device.type == "cuda":
        return torch.randn(shape, device=device).to(dtype)
    return torch.full(shape, 0.01, dtype=dtype, device=device)


def _attention_call(
    model: ModelConfig, dtype: torch.dtype, device: torch.device, batch_size: int, context_len: int
) -> Callable[[], torch.Tensor]:
    """One decode step's attention as the runtime runs it: one query token per sequence against
    ``context_len`` token-major keys, by the split-KV kernel where it runs (CUDA, fp16/bf16), else
    by ``attend`` (SDPA, the GQA group folded into the query rows)."""
    from kvpr.models.common import attend, attention_bias
    from kvpr.runtime.split_attention import Partials, attend_resident, fused_decode

    d = model.head_dim
    q = _filled((batch_size, model.num_q_heads, 1, d), dtype, device)  # [b, n_q, 1, d]
    k = _filled((context_len, batch_size, model.num_kv_heads, d), dtype, device)  # [s, b, n_kv, d]
    v = _filled((context_len, batch_size, model.num_kv_heads, d), dtype, device)  # [s, b, n_kv, d]
    valid = torch.ones(batch_size, context_len, dtype=torch.bool, device=device)  # [b, s]
    if fused_decode(device, dtype):
        partials = Partials()
        return lambda: attend_resident(q, k, v, valid, partials)
    bias = attention_bias(valid[:, None, None, :], dtype)  # [b, 1, 1, s]
    return lambda: attend(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), bias)


def _layer_gemms(
    model: ModelConfig, dtype: torch.dtype, device: torch.device, batch_size: int, max_weight_bytes: int
) -> Callable[[], None] | None:
    """The projections and MLP of one decode layer at M = b rows, if its weights fit the budget."""
    h, inter = model.hidden_size, model.intermediate_size
    mlp_in = 2 * inter if model.arch is Arch.LLAMA else inter  # gate+up fused (SwiGLU) or fc1
    shapes = [(h, model.q_size + 2 * model.kv_size), (model.q_size, h), (h, mlp_in), (inter, h)]
    elem = element_size(dtype)
    if sum(k * n for k, n in shapes) * elem > max_weight_bytes:
        return None
    weights = [_filled(shape, dtype, device) for shape in shapes]
    inputs = [_filled((batch_size, k), dtype, device) for k, _ in shapes]  # [b, in_features]

    def run() -> None:
        for x, w in zip(inputs, weights, strict=True):
            torch.mm(x, w)

    return run


def load_or_measure(
    device: torch.device,
    model: ModelConfig,
    dtype: torch.dtype,
    batch_size: int,
    path: str | os.PathLike[str] | None = None,
    reprofile: bool = False,
    progress: bool = False,
) -> HardwareProfile:
    """An explicit ``path`` is loaded (or, with ``reprofile``, measured into); otherwise the cached
    profile of this device, torch version and model shape is reused if it covers the model's
    recompute and dtype and is of this format, else measured and cached. Attention timings stay those
    of the batch first profiled."""
    device = torch.device(device)
    if path is not None and not reprofile:
        return HardwareProfile.load(path)
    name, version = device_name(device), str(torch.__version__)
    target = Path(path) if path is not None else default_profile_path(name, version, profile_shape(model, dtype))
    if not reprofile and target.exists():
        try:
            cached = HardwareProfile.load(target)
        except KvprError:
            cached = None  # stale or damaged cache: measure again and overwrite it
        if (
            cached is not None
            and cached.format_version == PROFILE_FORMAT_VERSION  # an older one lacks what the code now uses
            and (cached.device_name, cached.torch_version) == (name, version)
            and cached.covers(model, dtype)
        ):
            return cached
    profile = measure_profile(device, model, dtype, batch_size, progress)
    profile.save(target)
    return profile
