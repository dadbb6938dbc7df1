"""Measures the rates the cost model needs on this machine, and caches them as JSON.

Hardware numbers never live in code: the solver plans with a HardwareProfile measured here (CUDA:
pinned copies and GEMMs timed with events) or loaded from a file. On a CPU-only machine the same
quantities are measured on tiny sizes (memcpy, CPU matmul) so CI exercises every path in < 3 s.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvpr.config import Arch, ModelConfig
from kvpr.device import element_size
from kvpr.errors import KvprError
from kvpr.scheduler.cost_model import HostIssue, RateCurve

# 2: the recompute timed as the runtime runs it, per X codec; 3: host issue times, K,V codec decodes;
# 4: every repetition of the H2D copies (two kinds of pinned memory), device-memory bandwidth
PROFILE_FORMAT_VERSION = 4
READABLE_FORMATS = (3, 4)  # a format 3 profile loads with no H2D repetitions and no device-memory rates
COPY_REPEATS = 3  # H2D and device-memory points are each timed this many times, interleaved
_MIB = 1 << 20


@dataclass(frozen=True)
class HardwareProfile:
    """Measured transfer and compute rates of one device (and torch version), for one model shape."""

    device_name: str
    torch_version: str
    h2d: RateCurve  # (chunk bytes, bytes/s) of pinned host-to-device copies
    d2h: RateCurve  # (chunk bytes, bytes/s) of pinned device-to-host copies
    # (M rows, FLOP/s): the FLOPs of [M, gemm_hidden] x [gemm_hidden, gemm_kv_width] over the time of
    # the whole recompute of M rows as the runtime runs it (projections, bias, RoPE, layout)
    gemm: RateCurve
    gemm_hidden: int
    gemm_kv_width: int  # 2 * n_kv * d: K and V projections fused
    dtype: str = "float16"
    batch_size: int = 1  # batch of the attention timings
    attention: tuple[tuple[int, float], ...] = ()  # (context_len, seconds) of one decode attention
    decode_layer_s: float | None = None  # one decode layer's GEMMs at M = batch_size, no I/O, no attention
    gemm_arch: str = ""  # the architecture whose recompute was timed (RoPE or not, biases or not)
    # the same rate with X stored under an X codec, its decode included: {"int8": curve, "int4": curve}
    x_codec_gemm: dict[str, RateCurve] = field(default_factory=dict)
    # host seconds to issue one decode layer (no X chunks) and one X chunk more, per X codec ("none":
    # X in the model dtype), measured on the overlapped executor; empty on a CPU (no separate host)
    host_layer_s: dict[str, float] = field(default_factory=dict)
    host_chunk_s: dict[str, float] = field(default_factory=dict)
    # (stored bytes, bytes/s) of decoding the host tier's K,V codec parts into the staging buffers
    # after they land, per --kv-codec ("int8", "int4"); empty on a CPU
    kv_decode: dict[str, RateCurve] = field(default_factory=dict)
    # every repetition of the H2D copies, (bytes, bytes/s), per host memory: "pinned" (torch's
    # allocator, whose per-size medians are ``h2d``) and "registered" (cudaHostRegister, as the
    # runtime's host tier); empty in format 3
    h2d_samples: dict[str, tuple[tuple[float, float], ...]] = field(default_factory=dict)
    # device memory, at sizes beyond the L2 cache, best of the repetitions per size: (bytes copied,
    # bytes copied/s) of device-to-device copies and (bytes, bytes/s) of a read-only reduction;
    # None in format 3
    d2d: RateCurve | None = None
    hbm_read: RateCurve | None = None
    created: str = ""  # ISO 8601, UTC
    format_version: int = PROFILE_FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.gemm_hidden < 1 or self.gemm_kv_width < 1 or self.batch_size < 1:
            raise KvprError("profile has a GEMM width or batch size < 1: re-run kvpr profile")
        if any(s < 1 or not (math.isfinite(t) and t > 0) for s, t in self.attention):
            raise KvprError("profile has an attention timing that is not positive: re-run kvpr profile")
        if self.decode_layer_s is not None and not (math.isfinite(self.decode_layer_s) and self.decode_layer_s > 0):
            raise KvprError(f"profile has decode_layer_s={self.decode_layer_s}: re-run kvpr profile")
        host_times = (*self.host_layer_s.values(), *self.host_chunk_s.values())
        if any(not (math.isfinite(t) and t >= 0) for t in host_times):
            raise KvprError("profile has a host issue time that is negative or not a number: re-run kvpr profile")
        if any(not (n > 0 and math.isfinite(r) and r > 0) for pts in self.h2d_samples.values() for n, r in pts):
            raise KvprError("profile has an H2D sample that is not a positive number: re-run kvpr profile")

    def h2d_bytes_per_s(self, nbytes: float) -> float:
        return self.h2d.rate(nbytes)

    def d2h_bytes_per_s(self, nbytes: float) -> float:
        return self.d2h.rate(nbytes)

    def h2d_best(self) -> float:
        """The best H2D bandwidth measured at any size, in any repetition (what a floor may assume)."""
        samples = [rate for points in self.h2d_samples.values() for _, rate in points]
        return max([self.h2d.peak, *samples])

    def hbm_bytes_per_s(self) -> float | None:
        """The best device-memory traffic measured: a device copy moves its bytes twice (read and
        write), a reduction once; None where not measured (format 3)."""
        if self.d2d is None:
            return None
        return max(2.0 * self.d2d.peak, self.hbm_read.peak if self.hbm_read is not None else 0.0)

    def gemm_flop_per_s(self, rows: float) -> float:
        return self.gemm.rate(rows)

    def recompute_curve(self, x_codec: str = "none") -> RateCurve:
        """The recompute's rate with X stored under ``x_codec`` (its decode counted)."""
        if x_codec == "none":
            return self.gemm
        if x_codec not in self.x_codec_gemm:
            raise KvprError(f"this profile has no recompute timing for --x-codec {x_codec}: re-run kvpr profile")
        return self.x_codec_gemm[x_codec]

    def host_issue(self, x_codec: str = "none") -> HostIssue:
        """What issuing a layer costs the host with X under ``x_codec``; zero where not measured
        (a CPU profile: there the host is the device)."""
        return HostIssue(self.host_layer_s.get(x_codec, 0.0), self.host_chunk_s.get(x_codec, 0.0))

    def attention_s(self, context_len: int) -> float:
        """Linear in s between measured points; below/above them, proportional to the nearest one."""
        if not self.attention:
            raise KvprError("this profile has no attention timings: re-run kvpr profile")
        points = sorted(self.attention)
        for (s0, t0), (s1, t1) in pairwise(points):
            if s0 <= context_len <= s1:
                return t0 + (t1 - t0) * (context_len - s0) / (s1 - s0)
        s_end, t_end = points[0] if context_len < points[0][0] else points[-1]
        return t_end * context_len / s_end

    def covers(self, model: ModelConfig, dtype: torch.dtype) -> bool:
        """Whether the recompute rates were measured for this model's shape, architecture and dtype."""
        return (self.gemm_hidden, self.gemm_kv_width, self.gemm_arch, self.dtype) == (
            model.hidden_size,
            2 * model.kv_size,
            model.arch.value,
            _dtype_name(dtype),
        )

    def to_json(self) -> str:
        fields: dict[str, Any] = {
            "format_version": self.format_version,
            "device_name": self.device_name,
            "torch_version": self.torch_version,
            "created": self.created,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "h2d": [list(p) for p in self.h2d.points],
            "d2h": [list(p) for p in self.d2h.points],
            "gemm_hidden": self.gemm_hidden,
            "gemm_kv_width": self.gemm_kv_width,
            "gemm": [list(p) for p in self.gemm.points],
            "gemm_arch": self.gemm_arch,
            "x_codec_gemm": {name: [list(p) for p in curve.points] for name, curve in self.x_codec_gemm.items()},
            "attention": [list(p) for p in self.attention],
            "decode_layer_s": self.decode_layer_s,
            "host_layer_s": self.host_layer_s,
            "host_chunk_s": self.host_chunk_s,
            "kv_decode": {name: [list(p) for p in curve.points] for name, curve in self.kv_decode.items()},
            "h2d_samples": {name: [list(p) for p in points] for name, points in self.h2d_samples.items()},
            "d2d": None if self.d2d is None else [list(p) for p in self.d2d.points],
            "hbm_read": None if self.hbm_read is None else [list(p) for p in self.hbm_read.points],
        }
        # one line per measured point, [size, rate] (a newline never occurs inside a JSON string)
        number = r"(-?[0-9][0-9.eE+-]*)"
        return re.sub(rf"\[\n *{number},\n *{number}\n *\]", r"[\1, \2]", json.dumps(fields, indent=2))

    @classmethod
    def from_json(cls, text: str, source: str = "profile") -> HardwareProfile:
        fix = "delete it or re-run kvpr profile"
        try:
            data = json.loads(text)
            version = int(data["format_version"])
        except (ValueError, TypeError, KeyError) as problem:
            raise KvprError(f"{source} is not a kvpr profile ({problem}): {fix}") from None
        if version not in READABLE_FORMATS:
            readable = ", ".join(map(str, READABLE_FORMATS))
            raise KvprError(f"{source} has profile format {version}, this kvpr reads {readable}: {fix}")

        def curve(points: Any) -> RateCurve | None:
            return None if points is None else RateCurve.from_points((float(n), float(r)) for n, r in points)

        try:
            decode = data["decode_layer_s"]
            return cls(
                device_name=str(data["device_name"]),
                torch_version=str(data["torch_version"]),
                h2d=RateCurve.from_points((float(n), float(r)) for n, r in data["h2d"]),
                d2h=RateCurve.from_points((float(n), float(r)) for n, r in data["d2h"]),
                gemm=RateCurve.from_points((float(m), float(r)) for m, r in data["gemm"]),
                gemm_hidden=int(data["gemm_hidden"]),
                gemm_kv_width=int(data["gemm_kv_width"]),
                gemm_arch=str(data["gemm_arch"]),
                x_codec_gemm={
                    str(name): RateCurve.from_points((float(m), float(r)) for m, r in points)
                    for name, points in data["x_codec_gemm"].items()
                },
                dtype=str(data["dtype"]),
                batch_size=int(data["batch_size"]),
                attention=tuple((int(s), float(t)) for s, t in data["attention"]),
                decode_layer_s=None if decode is None else float(decode),
                host_layer_s={str(name): float(t) for name, t in data["host_layer_s"].items()},
                host_chunk_s={str(name): float(t) for name, t in data["host_chunk_s"].items()},
                kv_decode={
                    str(name): RateCurve.from_points((float(n), float(r)) for n, r in points)
                    for name, points in data.get("kv_decode", {}).items()  # absent: not timed
                },
                h2d_samples={  # absent before format 4, as are the device-memory rates
                    str(name): tuple((float(n), float(r)) for n, r in points)
                    for name, points in data.get("h2d_samples", {}).items()
                },
                d2d=curve(data.get("d2d")),
                hbm_read=curve(data.get("hbm_read")),
                created=str(data["created"]),
                format_version=version,
            )
        except (ValueError, TypeError, KeyError) as problem:
            kind = type(problem).__name__
            raise KvprError(f"{source} is a malformed kvpr profile ({kind}: {problem}): {fix}") from None
        except KvprError as problem:
            raise KvprError(f"{source}: {problem}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a reader never sees half a file); creates the directory."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_text(self.to_json() + "\n")
        partial.replace(target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HardwareProfile:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise KvprError(f"profile {path} not found: run kvpr profile to create it, or drop --profile") from None
        except OSError as problem:
            raise KvprError(f"profile {path} cannot be read ({problem.strerror}): check the path") from None
        return cls.from_json(text, source=f"profile {path}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_name(device: torch.device) -> str:
    """A human name of the device, stable across runs (the cache key)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine() or 'unknown'} x{os.cpu_count() or 1}"


def default_profile_path(device_name: str, torch_version: str, shape: str = "") -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/kvpr/profiles/<device>__torch-<version>[__<shape>].json;
    ``shape`` (``profile_shape``) keeps the profiles of different models side by side."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")

    def clean(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "unknown"

    suffix = f"__{clean(shape)}" if shape else ""
    return base / "kvpr" / "profiles" / f"{clean(device_name)}__torch-{clean(torch_version)}{suffix}.json"


def profile_shape(model: ModelConfig, dtype: torch.dtype) -> str:
    """What a profile's recompute timings depend on (see ``HardwareProfile.covers``)."""
    return f"{model.arch.value}-h{model.hidden_size}-kv{2 * model.kv_size}-{_dtype_name(dtype)}"


@dataclass(frozen=True)
class _Ladder:
    """Sizes and time budgets of one measurement run."""

    copy_bytes: tuple[int, ...]
    gemm_rows: tuple[int, ...]
    attention_lens: tuple[int, ...]
    min_time_s: float  # time each point for at least this long, after a warm-up
    phase_budget_s: float  # stop a ladder once its phase has taken this long
    layer_weight_bytes: int  # time the layer's GEMMs only if its weights fit in this


def _ladder(device: torch.device, model: ModelConfig, dtype: torch.dtype, batch_size: int) -> _Ladder:
    """CUDA: 1..256 MiB chunks and GEMMs to 64K rows, capped by free memory; CPU: tiny and quick."""
    elem = element_size(dtype)
    kv_row = 2 * model.num_kv_heads * model.head_dim * elem * batch_size  # K,V bytes per token
    row = (model.hidden_size + 2 * model.kv_size) * elem  # bytes of one GEMM input + output row
    if device.type != "cuda":
        budget = 64 * _MIB
        rows = tuple(4**k for k in range(6) if 4**k * row <= budget)
        lens = tuple(s for s in (64, 256, 1024, 4096) if s <= model.max_position and s * kv_row <= budget)
        return _Ladder(
            tuple(_MIB // 4 * 4**k for k in range(4)),
            rows or (1,),
            lens or (min(64, model.max_position),),
            min_time_s=0.01,
            phase_budget_s=0.25,
            layer_weight_bytes=budget,
        )
    free, _ = torch.cuda.mem_get_info(device)
    budget = free // 4
    copies = tuple(_MIB << k for k in range(9) if _MIB << k <= budget) or (_MIB,)
    rows = tuple(16 << k for k in range(13) if (16 << k) * row <= budget)
    lens = tuple(s for s in (128 << k for k in range(9)) if s <= model.max_position and s * kv_row <= budget)
    return _Ladder(
        copies, rows or (16,), lens or (128,), min_time_s=0.05, phase_budget_s=60.0, layer_weight_bytes=budget
    )


def _timer(device: torch.device, min_time_s: float) -> Callable[[Callable[[], object]], float]:
    """Seconds per call of ``fn``: warm up, then time ever more repeats until one run lasts ``min_time_s``."""

    def time_cuda(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):
            fn()  # warm-up: allocator, kernel choice, clocks
        reps = 1
        while True:
            start.record()  # both events on the current stream: they bracket exactly the repeats
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
            if elapsed >= min_time_s or reps >= 1 << 12:
                return elapsed / reps
            reps = min(1 << 12, max(2 * reps, math.ceil(reps * min_time_s / max(elapsed, 1e-7))))

    def time_cpu(fn: Callable[[], object]) -> float:
        fn()  # warm-up: first touch of pages, kernel choice
        reps = 1
        while True:
            begin = time.perf_counter()
            for _ in range(reps):
                fn()
            elapsed = time.perf_counter() - begin
            if elapsed >= min_time_s or reps >= 1 << 12:
                return elapsed / reps
            reps = min(1 << 12, max(2 * reps, math.ceil(reps * min_time_s / max(elapsed, 1e-7))))

    return time_cuda if device.type == "cuda" else time_cpu


class _Progress:
    """A rich progress bar per measurement phase when enabled; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def phase(self, name: str, total: int) -> None:
        if self._bar is not None:
            self._task = self._bar.add_task(name, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def _ladder_points(
    sizes: tuple[int, ...], budget_s: float, measure: Callable[[int], float], progress: _Progress
) -> list[tuple[int, float]]:
    """measure(size) for increasing sizes until the phase's time budget is spent (at least one)."""
    began, points = time.perf_counter(), []
    for size in sizes:
        points.append((size, measure(size)))
        progress.advance()
        if time.perf_counter() - began > budget_s:
            break
    return points


def measure_profile(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, batch_size: int, progress: bool = False
) -> HardwareProfile:
    """Measure H2D/D2H copy bandwidth, the recompute GEMM rate, decode attention and layer GEMM times."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cuda", "cpu"):
        raise KvprError(f"cannot profile device {device}: kvpr profiles cuda and cpu devices")
    ladder = _ladder(device, model, dtype, batch_size)
    clock = _timer(device, ladder.min_time_s)
    with _Progress(progress) as bar, torch.inference_mode():
        h2d, d2h, h2d_samples = _measure_copies(device, ladder, clock, bar)
        d2d, hbm_read = _measure_device_memory(device, ladder, clock, bar)
        gemm = _measure_recompute(device, model, dtype, ladder, clock, bar)
        bar.phase("decode attention and layer", len(ladder.attention_lens) + 1)
        attention = _ladder_points(
            ladder.attention_lens,
            ladder.phase_budget_s,
            lambda s: clock(_attention_call(model, dtype, device, batch_size, s)),
            bar,
        )
        layer = _layer_gemms(model, dtype, device, batch_size, ladder.layer_weight_bytes)
        decode_layer_s = clock(layer) if layer is not None else None
        bar.advance()
        host_layer_s, host_chunk_s = _measure_host_issue(device, model, dtype, bar)
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
        dtype=_dtype_name(dtype),
        batch_size=batch_size,
        attention=tuple(attention),
        decode_layer_s=decode_layer_s,
        host_layer_s=host_layer_s,
        host_chunk_s=host_chunk_s,
        kv_decode={name: RateCurve.from_points(points) for name, points in kv_decode.items()},
        h2d_samples={name: tuple(points) for name, points in h2d_samples.items()},
        d2d=RateCurve.from_points(d2d),
        hbm_read=RateCurve.from_points(hbm_read),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


_Clock = Callable[[Callable[[], object]], float]


def _measure_copies(
    device: torch.device, ladder: _Ladder, clock: _Clock, bar: _Progress
) -> tuple[list[tuple[int, float]], list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(bytes, bytes/s) both ways: pinned host <-> device on CUDA, plain memcpy between host tensors on CPU.

    H2D is timed ``COPY_REPEATS`` times per size, interleaved, from torch's pinned memory (the curve:
    per-size medians) and, on CUDA, from memory pinned by ``cudaHostRegister`` as the runtime's host
    tier is; every repetition is kept, so a floor can take the best the link ever did.
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
    measured = sorted({size for size, _ in samples["pinned"]})
    h2d = [(n, statistics.median(r for size, r in samples["pinned"] if size == n)) for n in measured]
    bar.phase("device -> host copies", len(ladder.copy_bytes))
    pinned = hosts["pinned"]
    d2h = _ladder_points(ladder.copy_bytes, ladder.phase_budget_s, lambda n: rate(dev[:n], pinned[:n]), bar)
    return h2d, d2h, samples


def _measure_device_memory(
    device: torch.device, ladder: _Ladder, clock: _Clock, bar: _Progress
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(bytes, bytes/s) of device-to-device copies and of a read-only reduction (max), at sizes beyond
    the L2 cache (256 MiB to 1 GiB on CUDA, as free memory allows), best of ``COPY_REPEATS`` per size:
    what the decode's weight and K,V reads can reach at most."""
    if device.type == "cuda":
        sizes = tuple(n for n in (256 * _MIB, 512 * _MIB, 1024 * _MIB) if 2 * n <= ladder.layer_weight_bytes)
        sizes = sizes or (min(ladder.copy_bytes[-1], 256 * _MIB),)
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
    device: torch.device, model: ModelConfig, dtype: torch.dtype, ladder: _Ladder, clock: _Clock, bar: _Progress
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
        bar.phase(f"recompute, X {name if codec else 'in ' + _dtype_name(dtype)}", len(ladder.gemm_rows))
        curves[name] = _ladder_points(
            ladder.gemm_rows,
            ladder.phase_budget_s,
            lambda rows, codec=codec, parts=parts: rows * flops_per_row / clock(recompute(rows, codec, parts)),
            bar,
        )
    return curves


def _measure_host_issue(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, bar: _Progress
) -> tuple[dict[str, float], dict[str, float]]:
    """Host seconds to issue one decode layer without X chunks, and one X chunk more, per X codec,
    timed on the overlapped executor itself (CUDA only: on a CPU the host is the device)."""
    if device.type != "cuda":
        return {}, {}
    return host_issue_times(device, model, dtype, bar)


def host_issue_times(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, bar: _Progress, rounds: int = 15
) -> tuple[dict[str, float], dict[str, float]]:
    """The measurement behind ``_measure_host_issue`` (runs on any device, for tests).

    Each decode call is timed on the host alone, at batch 1 and a 16-token context, where the GPU
    finishes a step well before the host has issued the next, so the call never waits: what is
    timed is Python, dispatch and launches, with the allocator in its steady state as in a run.
    Four executors take turns every round, so drift (clocks, other processes) hits them alike:
    a 2- and a 1-layer model without recompute (their difference is one layer, the embedding and
    logits cancel) and a 1-layer model alternating 1 and 16 X chunks (a chunk is 1/15 of that
    difference). Medians over ``rounds`` rounds.
    """
    from kvpr.cache.codec import X_CODEC_NAMES, make_x_codec
    from kvpr.cache.storage import CacheShape, KVStorage
    from kvpr.models.loader import build_model, init_dummy_weights
    from kvpr.runtime.latency import OverlappedExecutor
    from kvpr.scheduler.plan import StepSplit

    prompt, few, many, warm = 16, 1, 16, 4
    configs = {layers: replace(model, num_layers=layers, vocab_size=256) for layers in (1, 2)}
    models = {layers: build_model(config) for layers, config in configs.items()}
    for built in models.values():
        init_dummy_weights(built, device, dtype, seed=0)
    ids = torch.zeros(1, prompt, dtype=torch.long, device=device)

    def executor(layers: int, x_codec: str, split: Callable[[int], StepSplit], steps: int) -> OverlappedExecutor:
        shape = CacheShape.for_model(configs[layers], 1, prompt + steps, dtype)
        codec = make_x_codec(x_codec, model.hidden_size)
        storage = KVStorage(shape, torch.device("cpu"), pin=device.type == "cuda", store_inputs=True, x_codec=codec)
        built = OverlappedExecutor(models[layers], storage, device, True, split)
        built.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
        return built

    def host_s(run: OverlappedExecutor) -> float:
        begin = time.perf_counter()
        run.decode(ids[:, 0])
        return time.perf_counter() - begin

    bar.phase("host issue per layer and X chunk", len(X_CODEC_NAMES))
    layer_s, chunk_s = {}, {}
    for name in X_CODEC_NAMES:
        counts = itertools.cycle((few, many))  # the chunked executor's steps alternate
        one = executor(1, name, lambda _: StepSplit(0), warm + rounds)
        two = executor(2, name, lambda _: StepSplit(0), warm + rounds)
        chunked = executor(1, name, lambda _, counts=counts: StepSplit(prompt, next(counts)), 2 * (warm + rounds))
        samples: dict[str, list[float]] = {"one": [], "two": [], "few": [], "many": []}
        for round_index in range(warm + rounds):
            times = {"one": host_s(one), "two": host_s(two), "few": host_s(chunked), "many": host_s(chunked)}
            if round_index >= warm:  # allocator, kernel choice and caches settle in the first rounds
                for key, value in times.items():
                    samples[key].append(value)
        for run in (one, two, chunked):
            run.finish()
        median = {key: statistics.median(values) for key, values in samples.items()}
        layer_s[name] = max(0.0, median["two"] - median["one"])
        chunk_s[name] = max(0.0, (median["many"] - median["few"]) / (many - few))
        bar.advance()
    return layer_s, chunk_s


def _measure_kv_decode(
    device: torch.device, model: ModelConfig, dtype: torch.dtype, ladder: _Ladder, clock: _Clock, bar: _Progress
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
            for rows, seconds in _ladder_points(
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
    """One decode step's attention: one query token per sequence against ``context_len`` keys."""
    d = model.head_dim
    q = _filled((batch_size, model.num_q_heads, 1, d), dtype, device)  # [b, n_q, 1, d]
    k = _filled((batch_size, model.num_kv_heads, context_len, d), dtype, device)  # [b, n_kv, s, d]
    v = _filled((batch_size, model.num_kv_heads, context_len, d), dtype, device)  # [b, n_kv, s, d]
    gqa = model.num_q_heads != model.num_kv_heads
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)


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
