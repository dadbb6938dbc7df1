"""A device's measured rates as the planners read them, and the JSON file that caches them.

Hardware numbers never live in code: the solver plans with a HardwareProfile measured by profiler.py
or loaded from a file, kept one file per device, torch version and model shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from kvpr.config import ModelConfig
from kvpr.device import dtype_name
from kvpr.errors import KvprError
from kvpr.scheduler.cost_model import HostIssue, RateCurve

# 2: the recompute timed as the runtime runs it, per X codec; 3: host issue times, K,V codec decodes;
# 4: every repetition of the H2D copies (two kinds of pinned memory), device-memory bandwidth;
# 5: host chunk costs timed with the prompt on the host tier (format 4 timed chunks that never ran: 0);
# 6: the host's cost per K,V chunk (before: one K,V chunk a layer whatever the split), and decode
# attention timed as the runtime runs it (the split-KV kernel on CUDA; before: SDPA)
PROFILE_FORMAT_VERSION = 6
READABLE_FORMATS = (3, 4, 5, 6)  # a format 3 profile loads with no H2D repetitions and no device-memory rates


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
    # host seconds per K,V chunk beyond the one ``host_layer_s`` includes (0 before format 6)
    host_kv_chunk_s: float = 0.0
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
        host_times = (*self.host_layer_s.values(), *self.host_chunk_s.values(), self.host_kv_chunk_s)
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

    def host_issue(self, x_codec: str = "none", kv_slot_tokens: int = 0) -> HostIssue:
        """What issuing a layer costs the host with X under ``x_codec`` and K,V chunks of
        ``kv_slot_tokens``; zero where not measured (a CPU profile: there the host is the device)."""
        layer_s, chunk_s = self.host_layer_s.get(x_codec, 0.0), self.host_chunk_s.get(x_codec, 0.0)
        return HostIssue(layer_s, chunk_s, self.host_kv_chunk_s, kv_slot_tokens)

    def without_host_issue(self) -> HardwareProfile:
        """This profile for steps replayed as CUDA graphs: the host issues one launch a step, not
        a layer's ops, so no host time bounds the step."""
        return dataclasses.replace(self, host_layer_s={}, host_chunk_s={}, host_kv_chunk_s=0.0)

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
            dtype_name(dtype),
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
            "host_kv_chunk_s": self.host_kv_chunk_s,
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
                host_kv_chunk_s=float(data.get("host_kv_chunk_s", 0.0)),  # absent before format 6
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
    return f"{model.arch.value}-h{model.hidden_size}-kv{2 * model.kv_size}-{dtype_name(dtype)}"
