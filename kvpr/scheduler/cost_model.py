"""Cost of one decode layer's cache traffic under partial KV recomputation (DESIGN section 2).

Pure arithmetic on a measured profile, no torch: so the solver and ``kvpr plan`` run anywhere and
the solver can be checked against a brute force over every ``l``. Times are seconds; sizes are
bytes (copies) or GEMM rows; rates come from a ``RateCurve`` (piecewise linear in log(size)).

For a split at ``l`` (tokens ``[0, l)`` recomputed from X, ``[l, s)`` copied as K,V):

| term    | work                      | rate evaluated at                                   |
|---------|---------------------------|-----------------------------------------------------|
| t_x(l)  | b*l*h*ex bytes            | H2D bandwidth of one X block: all of X[0:l), or 1/c  |
| t_kv    | b*(s-l)*2*kv*ekv bytes    | H2D bandwidth of one block K,V[l:s)                 |
| t_dec   | the same bytes, decoded   | a K,V codec's measured decode rate (if any)         |
| t_rc(l) | b*l*2*h*2*kv FLOPs        | recompute rate at M = b*l rows, or b*l/c per chunk  |

The recompute rate is measured on the whole recompute as the runtime runs it (X decode under the
X codec, projections, bias, RoPE), expressed as the GEMMs' FLOPs per second of that time. Under a
K,V codec the landed parts of [l, s) are decoded on the compute stream before attention (t_dec).

SEQUENTIAL (the paper's schedule): ``T = t_x + max(t_rc, t_kv + t_dec)``, X copied and recomputed
as one block. CHUNKED (c chunks): ``T = max(t_x + t_kv, t_x/c + t_rc + t_dec)``, X copied in c
blocks of l/c tokens, each recomputed by its own GEMM as it lands, so the rates are those of one
chunk; the copy stream's and the compute stream's work per layer, each stream busy while the other
serves the neighbouring layer (t_dec = 0 without a K,V codec).
Both are written as ``T(l) = max over two branches of a weighted sum of the terms`` (StepModel),
the form the solver bounds.

ATTENTION: the runtime attends each piece of the cache on the compute stream as it is ready: the
GPU tier's ``r`` tokens in place, each recomputed or copied host chunk once it exists, merged by
log-sum-exp. That is attention over all ``r + s`` tokens whatever ``l`` is: a constant ``t_att``
(the profile's timed decode attention at ``r + s``, scaled to the batch; zero where the profile has
none) on CHUNKED's compute branch, and after both branches under SEQUENTIAL, which attends once
everything has landed. It lowers ``l`` where compute is the busier stream, and it is the whole
step when the host tier is empty.

HOST: the GPU cannot run ahead of the host that issues its work. Issuing a layer costs the host
``h_layer`` plus ``h_chunk`` per X chunk (both measured on the runtime itself, per X codec), so
``T(l) = max(device T(l), h_layer + min(c, l) * h_chunk)``: more chunks overlap better on the GPU
but cost the host more, which is why the number of chunks is chosen with ``l``.
"""

from __future__ import annotations

import enum
import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from kvpr.errors import KvprError

if TYPE_CHECKING:
    from kvpr.scheduler.profile import HardwareProfile


class Schedule(str, enum.Enum):
    """How a layer overlaps the X copy, the K,V copy and the recompute GEMM."""

    SEQUENTIAL = "sequential"  # copy X, then recompute || copy K,V
    CHUNKED = "chunked"  # copy X in chunks, recompute each as it lands, then copy K,V


def _positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


@dataclass(frozen=True)
class RateCurve:
    """A measured rate (bytes/s or FLOP/s) as a function of size (bytes or rows).

    Piecewise linear in log(size) between the measured points, clamped to the end points outside
    them: rate(size) = r0 + beta * ln(size / s0) on the segment [s0, s1].
    """

    sizes: tuple[float, ...]  # strictly increasing, > 0
    rates: tuple[float, ...]  # > 0, one per size

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.rates):
            raise KvprError("a rate curve needs one rate per size and at least one point: re-run kvpr profile")
        if not all(_positive_finite(v) for v in (*self.sizes, *self.rates)):
            raise KvprError("a rate curve has a size or rate that is not a positive number: re-run kvpr profile")
        if any(a >= b for a, b in pairwise(self.sizes)):
            raise KvprError("a rate curve's sizes are not strictly increasing: build it with RateCurve.from_points")

    @classmethod
    def from_points(cls, points: Iterable[tuple[float, float]]) -> RateCurve:
        """Sort (size, rate) points; repeated sizes are averaged."""
        by_size: dict[float, list[float]] = {}
        for size, rate in points:
            by_size.setdefault(float(size), []).append(float(rate))
        sizes = tuple(sorted(by_size))
        return cls(sizes, tuple(sum(by_size[s]) / len(by_size[s]) for s in sizes))

    @property
    def points(self) -> tuple[tuple[float, float], ...]:
        return tuple(zip(self.sizes, self.rates, strict=True))

    @property
    def peak(self) -> float:
        """The best measured rate (what a floor estimate may assume)."""
        return max(self.rates)

    def _segment_index(self, size: float) -> int:
        """j with sizes[j-1] <= size < sizes[j]; 0 below the curve, len(sizes) above it (clamped)."""
        if size < self.sizes[0]:
            return 0
        return bisect_right(self.sizes, size)

    def rate(self, size: float) -> float:
        j = self._segment_index(size)
        if j == 0 or j == len(self.sizes):
            return self.rates[0] if j == 0 else self.rates[-1]
        s0, s1, r0, r1 = self.sizes[j - 1], self.sizes[j], self.rates[j - 1], self.rates[j]
        return r0 + (r1 - r0) * (math.log(size / s0) / math.log(s1 / s0))

    def log_slope(self, size: float) -> float:
        """d rate / d ln(size) at ``size`` (0 where clamped)."""
        j = self._segment_index(size)
        if j == 0 or j == len(self.sizes):
            return 0.0
        return (self.rates[j] - self.rates[j - 1]) / math.log(self.sizes[j] / self.sizes[j - 1])

    def inflection_sizes(self) -> list[float]:
        """Sizes inside a segment where size/rate(size) turns from convex to concave.

        With r = r0 + beta*ln(size/s0), d2/dsize2 [size/r] has the sign of beta*(2*beta - r).
        """
        out = []
        for j in range(1, len(self.sizes)):
            s0, s1, r0 = self.sizes[j - 1], self.sizes[j], self.rates[j - 1]
            beta = (self.rates[j] - r0) / math.log(s1 / s0)
            if beta > 0:
                star = s0 * math.exp((2.0 * beta - r0) / beta)
                if s0 < star < s1:
                    out.append(star)
        return out


@dataclass(frozen=True)
class TimeTerm:
    """Seconds of work that grows affinely with ``l`` at a size-dependent rate.

    size(l) = size0 + size_per_token*l (bytes or rows); the work, work_per_size*size(l) bytes or
    FLOPs, runs in ``blocks`` equal blocks, each at curve.rate(size(l)/blocks).
    """

    curve: RateCurve
    size0: float
    size_per_token: float
    work_per_size: float
    blocks: float

    def seconds(self, split: float) -> float:
        size = self.size0 + self.size_per_token * split
        if size <= 0.0:
            return 0.0
        return self.work_per_size * size / self.curve.rate(size / self.blocks)

    def slope(self, split: float) -> float:
        """d seconds / d l: work*dz/dl*(r - beta)/r^2 with beta = d r / d ln(size)."""
        block = max(self.size0 + self.size_per_token * split, 0.0) / self.blocks
        rate, beta = self.curve.rate(block), self.curve.log_slope(block)
        return self.work_per_size * self.size_per_token * (rate - beta) / (rate * rate)

    def curvature(self, split: float) -> int:
        """+1 convex, -1 concave, 0 linear near ``split`` (constant between breakpoints())."""
        block = max(self.size0 + self.size_per_token * split, 0.0) / self.blocks
        beta = self.curve.log_slope(block)
        sign = beta * (2.0 * beta - self.curve.rate(block))
        return (sign > 0) - (sign < 0)

    def breakpoints(self) -> list[float]:
        """Every ``l`` where the rate segment or the curvature sign changes."""
        sizes = [*self.curve.sizes, *self.curve.inflection_sizes()]
        return [(size * self.blocks - self.size0) / self.size_per_token for size in sizes]


@dataclass(frozen=True)
class LayerShape:
    """One decode layer's cache: batch, context and the stored bytes per element of X and K,V.

    Element sizes are parameters (2 for fp16; a codec may store 0.25 bytes per element);
    ``x_codec`` names how X is stored, whose decode the recompute rate then includes; ``kv_codec``
    how K,V are, whose decode (after they land, before attention) the K,V load then includes.
    """

    batch_size: int
    context_len: int
    hidden_size: int
    kv_size: int  # n_kv * d: elements of K (or V) per token
    x_bytes_per_token_elem: float
    kv_bytes_per_token_elem: float
    x_codec: str = "none"
    kv_codec: str = "none"
    resident_len: int = 0  # tokens of the GPU tier, attended in place beside the host's context_len

    def __post_init__(self) -> None:
        for name in ("batch_size", "hidden_size", "kv_size"):
            if getattr(self, name) < 1:
                raise KvprError(f"layer shape has {name}={getattr(self, name)}: must be >= 1")
        for name in ("context_len", "resident_len"):
            if getattr(self, name) < 0:
                raise KvprError(f"layer shape has {name}={getattr(self, name)}: must be >= 0")
        for name in ("x_bytes_per_token_elem", "kv_bytes_per_token_elem"):
            if not _positive_finite(getattr(self, name)):
                raise KvprError(f"layer shape has {name}={getattr(self, name)}: must be a positive byte count")

    def x_bytes(self, num_tokens: float) -> float:
        return self.batch_size * num_tokens * self.hidden_size * self.x_bytes_per_token_elem

    def kv_bytes(self, num_tokens: float) -> float:
        return self.batch_size * num_tokens * 2 * self.kv_size * self.kv_bytes_per_token_elem

    def recompute_flops(self, num_tokens: float) -> float:
        """[b*l, h] x [h, 2*kv]: 2*h FLOPs per output element."""
        return self.batch_size * num_tokens * 2.0 * self.hidden_size * 2 * self.kv_size


def x_copy_term(shape: LayerShape, profile: HardwareProfile, blocks: int = 1) -> TimeTerm:
    """t_x as a function of l: X[0:l) over H2D in ``blocks`` equal blocks."""
    return TimeTerm(profile.h2d, 0.0, shape.x_bytes(1), 1.0, float(blocks))


def kv_copy_term(shape: LayerShape, profile: HardwareProfile) -> TimeTerm:
    """t_kv(s - l) as a function of l: K,V[l:s) over H2D as one block."""
    per_token = shape.kv_bytes(1)
    return TimeTerm(profile.h2d, per_token * shape.context_len, -per_token, 1.0, 1.0)


def kv_decode_term(shape: LayerShape, profile: HardwareProfile) -> TimeTerm | None:
    """t_dec(s - l): decoding the K,V codec's parts of [l, s) once landed, at the rate measured per
    stored byte; None for K,V stored as computed (or a profile without the timing)."""
    curve = profile.kv_decode.get(shape.kv_codec)
    if curve is None:
        return None
    per_token = shape.kv_bytes(1)
    return TimeTerm(curve, per_token * shape.context_len, -per_token, 1.0, 1.0)


def recompute_term(shape: LayerShape, profile: HardwareProfile, blocks: int = 1) -> TimeTerm:
    """t_rc as a function of l: size = M = b*l rows, work = FLOPs per row, ``blocks`` recomputes."""
    return TimeTerm(
        profile.recompute_curve(shape.x_codec),
        0.0,
        float(shape.batch_size),
        shape.recompute_flops(1) / shape.batch_size,
        float(blocks),
    )


def attention_s(shape: LayerShape, profile: HardwareProfile) -> float:
    """t_att: one layer's decode attention over every cached token (GPU tier and host tier), from the
    profile's timings at its batch, scaled linearly to this batch; 0 where none were timed."""
    tokens = shape.resident_len + shape.context_len
    if not profile.attention or tokens == 0:
        return 0.0
    return profile.attention_s(tokens) * shape.batch_size / profile.batch_size


Weights = tuple[float, ...]  # weights on (t_x, t_kv, t_rc[, t_dec])


@dataclass(frozen=True)
class HostIssue:
    """Host seconds to issue one decode layer: ``layer_s`` without X chunks and with one K,V chunk
    (as the profiler times it), ``chunk_s`` per X chunk, ``kv_chunk_s`` per K,V chunk beyond that
    one (or one fewer where no K,V is copied); K,V chunks hold ``kv_slot_tokens`` tokens (0: unknown,
    counted as one chunk whatever the split, as profiles before format 6 did)."""

    layer_s: float = 0.0
    chunk_s: float = 0.0
    kv_chunk_s: float = 0.0
    kv_slot_tokens: int = 0

    def kv_chunks(self, copied: float) -> int:
        """K,V chunks of ``copied`` host tokens, each at most a ring slot."""
        if not self.kv_slot_tokens:
            return 1
        return math.ceil(max(copied, 0.0) / self.kv_slot_tokens)

    def seconds(self, split: float, num_chunks: int, context_len: int = 0) -> float:
        """A split of l tokens runs min(c, l) X chunks (chunks are never empty) and the K,V chunks of
        the s - l tokens left."""
        x_chunks = min(float(num_chunks), max(split, 0.0))
        return self.layer_s + x_chunks * self.chunk_s + (self.kv_chunks(context_len - split) - 1) * self.kv_chunk_s

    def lower_bound(self, first: float, last: float, num_chunks: int, context_len: int) -> float:
        """The least ``seconds`` over splits in [first, last]: the X chunks grow with l and the K,V
        chunks shrink, so each takes its value at its favourable end."""
        x_chunks = min(float(num_chunks), max(first, 0.0))
        return self.layer_s + x_chunks * self.chunk_s + (self.kv_chunks(context_len - last) - 1) * self.kv_chunk_s


@dataclass(frozen=True)
class StepModel:
    """T(l) = max(branch_a . terms(l) + fixed_a, branch_b . terms(l) + fixed_b, host(l)), terms =
    (t_x, t_kv, t_rc), and t_dec under a K,V codec whose decode was timed; ``fixed_a``/``fixed_b``:
    each branch's work that does not depend on l (the attention)."""

    terms: tuple[TimeTerm, ...]
    branch_a: Weights
    branch_b: Weights
    host: HostIssue = HostIssue()
    num_chunks: int = 1
    fixed_a: float = 0.0
    fixed_b: float = 0.0
    context_len: int = 0  # s: the host tokens split into [0, l) recomputed and [l, s) copied

    def __post_init__(self) -> None:
        if not len(self.terms) == len(self.branch_a) == len(self.branch_b):
            raise KvprError("a step model needs one weight per term in each branch")

    def combine(self, split: float, values: tuple[float, ...]) -> float:
        """T at ``split`` from the terms' values there."""
        device = max(
            sum(w * v for w, v in zip(self.branch_a, values, strict=True)) + self.fixed_a,
            sum(w * v for w, v in zip(self.branch_b, values, strict=True)) + self.fixed_b,
        )
        return max(device, self.host_s(split))

    def host_s(self, split: float) -> float:
        """Host issue time at ``split``."""
        return self.host.seconds(split, self.num_chunks, self.context_len)

    def host_lower_bound(self, first: float, last: float) -> float:
        """The least host issue time over splits in [first, last]."""
        return self.host.lower_bound(first, last, self.num_chunks, self.context_len)

    def seconds(self, split: float) -> float:
        return self.combine(split, tuple(term.seconds(split) for term in self.terms))


def step_model(shape: LayerShape, profile: HardwareProfile, schedule: Schedule, num_chunks: int = 8) -> StepModel:
    """The cost T(l) of one layer under ``schedule``, ready to evaluate or to bound."""
    if num_chunks < 1:
        raise KvprError(f"num_chunks={num_chunks}: must be >= 1")
    decode, attend = kv_decode_term(shape, profile), attention_s(shape, profile)
    if schedule is Schedule.SEQUENTIAL:
        # t_x + max(t_rc, t_kv + t_dec) == max(t_x + t_rc, t_x + t_kv + t_dec); X moves as one chunk
        chunks, fixed = 1, (attend, attend)
        copy_branch, compute_branch = (1.0, 0.0, 1.0, 0.0), (1.0, 1.0, 0.0, 1.0)
    elif schedule is Schedule.CHUNKED:
        # copy stream: X chunks, then K,V; compute stream: the recompute as chunks land, then the
        # decode of the landed K,V (while the copy stream serves the next layer)
        chunks, fixed = num_chunks, (0.0, attend)
        copy_branch, compute_branch = (1.0, 1.0, 0.0, 0.0), (1.0 / num_chunks, 0.0, 1.0, 1.0)
    else:
        raise KvprError(f"unknown schedule {schedule!r}: use Schedule.SEQUENTIAL or Schedule.CHUNKED")
    terms = (
        x_copy_term(shape, profile, chunks),
        kv_copy_term(shape, profile),
        recompute_term(shape, profile, chunks),
        *(() if decode is None else (decode,)),
    )
    count = len(terms)  # the weights of t_dec drop out without a K,V codec
    host = profile.host_issue(shape.x_codec, kv_slot_tokens(shape, profile))
    return StepModel(terms, copy_branch[:count], compute_branch[:count], host, chunks, *fixed, shape.context_len)


def kv_slot_tokens(shape: LayerShape, profile: HardwareProfile) -> int:
    """Tokens of one K,V ring slot of the offloaded executor, by its own rule
    (``runtime.latency.slot_tokens_for``): uncompressed K,V in the profile's dtype."""
    from kvpr.runtime.latency import tokens_per_slot  # the runtime imports the scheduler, not the reverse

    per_token = 2 * shape.batch_size * shape.kv_size * getattr(torch, profile.dtype).itemsize
    return tokens_per_slot(per_token, shape.context_len)


def _check_split(shape: LayerShape, recompute_len: int) -> None:
    if not 0 <= recompute_len <= shape.context_len:
        raise KvprError(f"recompute_len={recompute_len} outside [0, context_len={shape.context_len}]")


def x_copy_s(shape: LayerShape, profile: HardwareProfile, recompute_len: int, blocks: int = 1) -> float:
    """t_x(l): copy X of the first l tokens, in ``blocks`` equal blocks."""
    _check_split(shape, recompute_len)
    return x_copy_term(shape, profile, blocks).seconds(recompute_len)


def kv_copy_s(shape: LayerShape, profile: HardwareProfile, copy_len: int) -> float:
    """t_kv(n): copy K,V of the last n = s - l tokens as one block."""
    _check_split(shape, copy_len)
    return kv_copy_term(shape, profile).seconds(shape.context_len - copy_len)


def recompute_s(shape: LayerShape, profile: HardwareProfile, recompute_len: int, blocks: int = 1) -> float:
    """t_rc(l): recompute K and V of the first l tokens from X, in ``blocks`` GEMMs."""
    _check_split(shape, recompute_len)
    return recompute_term(shape, profile, blocks).seconds(recompute_len)


def step_s(
    shape: LayerShape, profile: HardwareProfile, recompute_len: int, schedule: Schedule, num_chunks: int = 8
) -> float:
    """Predicted T(l) of one layer under ``schedule``."""
    _check_split(shape, recompute_len)
    return step_model(shape, profile, schedule, num_chunks).seconds(recompute_len)


def sequential_s(shape: LayerShape, profile: HardwareProfile, recompute_len: int) -> float:
    """T(l) = t_x(l) + max(t_rc(l), t_kv(s-l))."""
    return step_s(shape, profile, recompute_len, Schedule.SEQUENTIAL)


def chunked_s(shape: LayerShape, profile: HardwareProfile, recompute_len: int, num_chunks: int) -> float:
    """T(l) = max(t_x(l) + t_kv(s-l), t_x(l)/c + t_rc(l)) with chunk-sized rates."""
    return step_s(shape, profile, recompute_len, Schedule.CHUNKED, num_chunks)


def full_copy_s(shape: LayerShape, profile: HardwareProfile) -> float:
    """Copy every token's K,V: both schedules' T(0) on the device (T(0) is also at least the host's
    time to issue the layer)."""
    return kv_copy_s(shape, profile, shape.context_len)


def floor_s(shape: LayerShape, profile: HardwareProfile, recompute_len: int) -> float:
    """No schedule beats this at split l: its PCIe bytes at the best bandwidth measured (any size or
    repetition), or its FLOPs at peak rate. (benchmarks/floors.py adds the weight and K,V reads.)"""
    _check_split(shape, recompute_len)
    pcie_bytes = shape.x_bytes(recompute_len) + shape.kv_bytes(shape.context_len - recompute_len)
    recompute_peak = profile.recompute_curve(shape.x_codec).peak
    return max(pcie_bytes / profile.h2d_best(), shape.recompute_flops(recompute_len) / recompute_peak)
