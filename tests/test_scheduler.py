"""Scheduler: rate curves, profile JSON and measurement, cost model, exact split solver, plans."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import H100, MIB, synthetic_profile
from kvpr.config import Arch, ModelConfig
from kvpr.errors import KvprError
from kvpr.scheduler import profiler
from kvpr.scheduler.cost_model import (
    LayerShape,
    RateCurve,
    Schedule,
    TimeTerm,
    attention_s,
    chunked_s,
    floor_s,
    full_copy_s,
    kv_copy_s,
    kv_slot_tokens,
    recompute_s,
    sequential_s,
    step_model,
    step_s,
    x_copy_s,
)
from kvpr.scheduler.plan import CHUNK_CHOICES, SplitPlan, StepSplit, format_plans, plan_decode_step
from kvpr.scheduler.profile import HardwareProfile, default_profile_path, device_name, profile_shape
from kvpr.scheduler.profiler import load_or_measure, measure_profile
from kvpr.scheduler.profiler_timing import Progress
from kvpr.scheduler.solver import resident_tokens, solve_split


def model_config(
    hidden: int, num_q_heads: int, num_kv_heads: int, num_layers: int = 2, max_position: int = 4096
) -> ModelConfig:
    return ModelConfig(
        arch=Arch.LLAMA,
        model_type="llama",
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_layers=num_layers,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=hidden // num_q_heads,
        max_position=max_position,
    )


TINY = model_config(64, 4, 2)


# ---------------------------------------------------------------- rate curves and profiles


def test_rate_curve_interpolates_in_log_size_and_clamps() -> None:
    curve = RateCurve.from_points([(4 * MIB, 40e9), (MIB, 20e9)])
    assert curve.sizes == (MIB, 4 * MIB)
    assert curve.rate(2 * MIB) == pytest.approx(30e9)  # halfway in log(size)
    assert curve.rate(MIB * 2**0.5) == pytest.approx(25e9)
    assert curve.rate(1) == 20e9 and curve.rate(1e12) == 40e9  # clamped at both ends
    assert curve.log_slope(2 * MIB) == pytest.approx(20e9 / math.log(4))
    assert curve.log_slope(1) == 0.0 and curve.peak == 40e9
    assert RateCurve.from_points([(1, 2.0), (1, 4.0)]).rates == (3.0,)  # repeated sizes averaged
    profile = synthetic_profile([(MIB, 20e9), (4 * MIB, 40e9)], [(16, 1e12), (256, 5e12)])
    assert profile.h2d_bytes_per_s(2 * MIB) == pytest.approx(30e9)
    assert profile.gemm_flop_per_s(64) == pytest.approx(3e12)
    assert profile.gemm_flop_per_s(1) == 1e12 and profile.gemm_flop_per_s(1 << 20) == 5e12


@pytest.mark.parametrize("points", [[], [(0.0, 1.0)], [(1.0, -1.0)], [(1.0, math.nan)]])
def test_rate_curve_rejects_bad_points(points: list[tuple[float, float]]) -> None:
    with pytest.raises(KvprError):
        RateCurve.from_points(points)


def test_attention_interpolates_and_scales_beyond_points() -> None:
    assert H100.attention_s(2048) == pytest.approx(1e-4 + 2e-4 / 3)
    assert H100.attention_s(8192) == pytest.approx(6e-4)  # proportional to s past the last point
    assert H100.attention_s(512) == pytest.approx(0.5e-4)


def test_profile_json_round_trip(tmp_path: Path) -> None:
    assert HardwareProfile.from_json(H100.to_json()) == H100
    path = H100.save(tmp_path / "deep" / "dir" / "p.json")
    assert HardwareProfile.load(path) == H100
    assert json.loads(path.read_text())["h2d"][0] == [MIB, 28e9]
    untimed = json.loads(H100.to_json())
    del untimed["kv_decode"]  # written before the K,V codec decode was timed: no decode term
    assert HardwareProfile.from_json(json.dumps(untimed)) == H100


def test_profile_load_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(KvprError, match="not found"):
        HardwareProfile.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KvprError, match="not a kvpr profile"):
        HardwareProfile.load(bad)
    data = json.loads(H100.to_json())
    del data["gemm"]
    bad.write_text(json.dumps(data))
    with pytest.raises(KvprError, match="malformed"):
        HardwareProfile.load(bad)
    data = json.loads(H100.to_json())
    data["h2d"] = [[MIB, -5.0]]
    bad.write_text(json.dumps(data))
    with pytest.raises(KvprError, match="positive"):
        HardwareProfile.load(bad)
    data = json.loads(H100.to_json())
    data["format_version"] = 999
    bad.write_text(json.dumps(data))
    with pytest.raises(KvprError, match="format 999"):
        HardwareProfile.load(bad)


def test_measure_profile_on_cpu_for_real_and_round_trip() -> None:
    began = time.perf_counter()
    profile = measure_profile(torch.device("cpu"), TINY, torch.float32, batch_size=2, progress=False)
    assert time.perf_counter() - began < 15.0  # phases are budgeted to ~2 s; this catches a runaway only
    assert profile.device_name == device_name(torch.device("cpu"))
    assert profile.torch_version == str(torch.__version__) and profile.dtype == "float32"
    assert (profile.gemm_hidden, profile.gemm_kv_width, profile.batch_size) == (64, 64, 2)
    assert profile.covers(TINY, torch.float32) and not profile.covers(TINY, torch.float16)
    other_arch = Arch.OPT if TINY.arch is Arch.LLAMA else Arch.LLAMA
    assert not profile.covers(dataclasses.replace(TINY, arch=other_arch), torch.float32)  # RoPE or not
    assert set(profile.x_codec_gemm) == {"int8", "int4"}  # the recompute from encoded X, decode included
    assert profile.host_layer_s == {} and profile.host_issue("int4").layer_s == 0.0  # a CPU is its own host
    assert all(1e6 < rate < 1e13 for curve in profile.x_codec_gemm.values() for rate in curve.rates)
    assert len(profile.h2d.sizes) >= 2 and profile.h2d.sizes[0] == MIB // 4
    assert len(profile.gemm.sizes) >= 2 and len(profile.attention) >= 2
    # a memcpy runs at 10 MB/s .. 1 TB/s and a tiny matmul at 1 MFLOP/s .. 10 TFLOP/s on any CPU
    assert all(1e7 < rate < 1e12 for rate in (*profile.h2d.rates, *profile.d2h.rates))
    assert all(1e6 < rate < 1e13 for rate in profile.gemm.rates)
    assert profile.decode_layer_s is not None and 0 < profile.decode_layer_s < 0.1
    assert HardwareProfile.from_json(profile.to_json()) == profile


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_profile_on_cuda() -> None:
    model = model_config(1024, 16, 4, max_position=4096)
    profile = measure_profile(torch.device("cuda"), model, torch.float16, batch_size=8, progress=False)
    assert profile.device_name == torch.cuda.get_device_name() and profile.dtype == "float16"
    assert profile.h2d.sizes[0] == MIB and len(profile.h2d.sizes) >= 4
    # any PCIe or NVLink-C2C link: 1 to 1000 GB/s; larger pinned chunks are not slower than 1 MiB ones
    assert all(1e9 < rate < 1e12 for rate in (*profile.h2d.rates, *profile.d2h.rates))
    assert profile.h2d.rate(max(profile.h2d.sizes)) > profile.h2d.rate(MIB)
    assert profile.gemm.rate(max(profile.gemm.sizes)) > profile.gemm.rate(16)  # bigger GEMMs run closer to peak
    assert profile.decode_layer_s is not None and len(profile.attention) >= 4
    assert HardwareProfile.from_json(profile.to_json()) == profile


def test_default_profile_path_is_sanitized_under_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = default_profile_path("NVIDIA H100 80GB HBM3", "2.11.0+cu128")
    assert path == tmp_path / "kvpr" / "profiles" / "NVIDIA_H100_80GB_HBM3__torch-2.11.0_cu128.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_profile_path("a/../b", "1").parent == Path.home() / ".cache" / "kvpr" / "profiles"
    assert "/" not in default_profile_path("a/../b", "1").name
    assert (
        default_profile_path("a", "1", "llama-h4096-kv2048-float16").name
        == "a__torch-1__llama-h4096-kv2048-float16.json"
    )


def test_load_or_measure_reuses_only_a_matching_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls: list[ModelConfig] = []

    def fake_measure(
        device: torch.device, model: ModelConfig, dtype: torch.dtype, batch_size: int, progress: bool
    ) -> HardwareProfile:
        calls.append(model)
        return HardwareProfile(
            device_name=device_name(device),
            torch_version=str(torch.__version__),
            h2d=H100.h2d,
            d2h=H100.d2h,
            gemm=H100.gemm,
            gemm_hidden=model.hidden_size,
            gemm_kv_width=2 * model.kv_size,
            gemm_arch=model.arch.value,
            dtype=str(dtype).removeprefix("torch."),
            batch_size=batch_size,
            created=f"run {len(calls)}",
        )

    monkeypatch.setattr(profiler, "measure_profile", fake_measure)
    cpu = torch.device("cpu")
    first = load_or_measure(cpu, TINY, torch.float32, 2)
    assert len(calls) == 1
    assert default_profile_path(first.device_name, first.torch_version, profile_shape(TINY, torch.float32)).exists()
    assert load_or_measure(cpu, TINY, torch.float32, 2) == first and len(calls) == 1  # cache hit
    other = model_config(128, 4, 4)
    assert load_or_measure(cpu, other, torch.float32, 2).gemm_hidden == 128 and len(calls) == 2  # new shape
    assert load_or_measure(cpu, other, torch.float32, 2, reprofile=True).created == "run 3"
    cache = default_profile_path(first.device_name, first.torch_version, profile_shape(other, torch.float32))
    cache.write_text("damaged")
    assert load_or_measure(cpu, other, torch.float32, 2).created == "run 4"  # damaged cache re-measured
    explicit = tmp_path / "mine.json"
    with pytest.raises(KvprError, match="not found"):
        load_or_measure(cpu, TINY, torch.float32, 2, path=explicit)
    H100.save(explicit)
    assert load_or_measure(cpu, TINY, torch.float32, 2, path=explicit) == H100  # explicit path: as is
    assert len(calls) == 4


# ---------------------------------------------------------------- cost model


# The paper's cost model: the transfer and recompute terms alone (no attention timed).
PAPER_H100 = dataclasses.replace(H100, attention=())


def test_cost_model_matches_hand_arithmetic() -> None:
    profile = synthetic_profile([(1.0, 10e9)], [(1.0, 1e12)], attention=())  # B = 10 GB/s, F = 1 TFLOP/s
    shape = LayerShape(
        batch_size=2,
        context_len=100,
        hidden_size=64,
        kv_size=32,
        x_bytes_per_token_elem=2,
        kv_bytes_per_token_elem=0.25,
    )
    split = 40
    t_x = 2 * split * 64 * 2 / 10e9
    t_kv = 2 * (100 - split) * 2 * 32 * 0.25 / 10e9
    t_rc = 2 * split * 2 * 64 * 2 * 32 / 1e12
    assert x_copy_s(shape, profile, split) == pytest.approx(t_x, rel=1e-12)
    assert kv_copy_s(shape, profile, 100 - split) == pytest.approx(t_kv, rel=1e-12)
    assert recompute_s(shape, profile, split) == pytest.approx(t_rc, rel=1e-12)
    assert sequential_s(shape, profile, split) == pytest.approx(t_x + max(t_rc, t_kv), rel=1e-12)
    assert chunked_s(shape, profile, split, 4) == pytest.approx(max(t_x + t_kv, t_x / 4 + t_rc), rel=1e-12)
    assert full_copy_s(shape, profile) == pytest.approx(2 * 100 * 64 * 0.25 / 10e9, rel=1e-12)
    for schedule in Schedule:
        assert step_s(shape, profile, 0, schedule) == full_copy_s(shape, profile)
    assert floor_s(shape, profile, split) == pytest.approx(max((2 * split * 64 * 2 + 2 * 60 * 64 * 0.25) / 10e9, t_rc))
    with pytest.raises(KvprError):
        step_s(shape, profile, 101, Schedule.SEQUENTIAL)


def test_cost_model_evaluates_rates_at_the_copied_block_size() -> None:
    profile = synthetic_profile([(MIB, 10e9), (64 * MIB, 40e9)], [(64, 1e12), (4096, 4e12)], attention=())
    shape = LayerShape(32, 2048, 1024, 1024, 2, 2)  # X of 2048 tokens: 128 MiB
    assert x_copy_s(shape, profile, 2048) == pytest.approx(128 * MIB / 40e9)  # one block, clamped at 64 MiB
    assert x_copy_s(shape, profile, 2048, blocks=8) == pytest.approx(128 * MIB / profile.h2d.rate(16 * MIB))
    assert recompute_s(shape, profile, 2048, blocks=16) == pytest.approx(
        shape.recompute_flops(2048) / profile.gemm.rate(32 * 2048 / 16)
    )
    t_x, t_rc = x_copy_s(shape, profile, 2048, blocks=8), recompute_s(shape, profile, 2048, blocks=8)
    assert chunked_s(shape, profile, 2048, 8) == pytest.approx(max(t_x, t_x / 8 + t_rc))


# ---------------------------------------------------------------- solver


def brute_force(
    shape: LayerShape, profile: HardwareProfile, schedule: Schedule, num_chunks: int, granularity: int
) -> tuple[list[int], float]:
    grid = sorted({*range(0, shape.context_len + 1, granularity), shape.context_len})
    model = step_model(shape, profile, schedule, num_chunks)
    return grid, min(model.seconds(split) for split in grid)


@st.composite
def rate_curves(draw: st.DrawFn, low: float, high: float, rate_low: float, rate_high: float) -> RateCurve:
    count = draw(st.integers(1, 6))
    exponents = draw(
        st.lists(st.floats(math.log10(low), math.log10(high)), min_size=count, max_size=count, unique=True)
    )
    rates = draw(st.lists(st.floats(math.log10(rate_low), math.log10(rate_high)), min_size=count, max_size=count))
    return RateCurve.from_points((10**e, 10**r) for e, r in zip(exponents, rates, strict=True))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 64),
    s=st.integers(0, 2500),
    h=st.integers(16, 8192),
    kv=st.integers(8, 8192),
    ex=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]),
    ekv=st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0]),
    h2d=rate_curves(1e3, 1e10, 1e8, 1e11),
    gemm=rate_curves(1.0, 1e6, 1e10, 1e15),
    schedule=st.sampled_from(list(Schedule)),
    num_chunks=st.integers(1, 16),
    granularity=st.one_of(st.just(1), st.integers(1, 300)),
    host_layer=st.one_of(st.just(0.0), st.floats(1e-6, 1e-2)),
    host_chunk=st.one_of(st.just(0.0), st.floats(1e-7, 1e-3)),
    host_kv_chunk=st.one_of(st.just(0.0), st.floats(1e-7, 1e-3)),
    decode=st.one_of(st.none(), rate_curves(1e3, 1e10, 1e8, 1e11)),
    attention=st.one_of(st.just(()), st.tuples(st.tuples(st.integers(1, 8192), st.floats(1e-6, 1e-2)))),
    resident=st.integers(0, 4000),
)
def test_solver_equals_brute_force_minimum(
    b: int,
    s: int,
    h: int,
    kv: int,
    ex: float,
    ekv: float,
    h2d: RateCurve,
    gemm: RateCurve,
    schedule: Schedule,
    num_chunks: int,
    granularity: int,
    host_layer: float,
    host_chunk: float,
    host_kv_chunk: float,
    decode: RateCurve | None,
    attention: tuple[tuple[int, float], ...],
    resident: int,
) -> None:
    host = {
        "host_layer_s": {"none": host_layer},
        "host_chunk_s": {"none": host_chunk},
        "host_kv_chunk_s": host_kv_chunk,
    }
    kv_decode = {} if decode is None else {"int4": decode}
    profile = HardwareProfile(
        "synthetic", "0", h2d, h2d, gemm, h, 2 * kv, **host, kv_decode=kv_decode, attention=attention
    )
    shape = LayerShape(b, s, h, kv, ex, ekv, kv_codec="none" if decode is None else "int4", resident_len=resident)
    choice = solve_split(shape, profile, schedule, num_chunks, granularity)
    grid, best = brute_force(shape, profile, schedule, num_chunks, granularity)
    assert choice.recompute_len in grid
    assert choice.predicted_s == step_s(shape, profile, choice.recompute_len, schedule, num_chunks)
    assert choice.predicted_s <= best * (1 + 1e-9)
    if decode is None:
        copy_all = max(full_copy_s(shape, profile), attention_s(shape, profile))  # T(0): no chunks to issue
        if schedule is Schedule.SEQUENTIAL:
            copy_all = full_copy_s(shape, profile) + attention_s(shape, profile)
        host_at_0 = host_layer + (math.ceil(s / kv_slot_tokens(shape, profile)) - 1) * host_kv_chunk  # K,V chunks
        assert choice.copy_all_s == pytest.approx(max(copy_all, host_at_0), rel=1e-12)


@pytest.mark.parametrize("schedule", list(Schedule))
@pytest.mark.parametrize(
    ("hidden", "kv_size", "ex", "ekv"),
    [
        (4096, 1024, 2, 2),  # Llama-3-8B: X is 2x K,V
        (576, 192, 2, 2),  # SmolLM2-135M: X is 1.5x K,V
        (4096, 4096, 2, 0.5),  # OPT-6.7B with 4-bit K,V and fp16 X: X is 2x the encoded K,V
    ],
)
def test_solver_finds_no_recompute_when_x_outweighs_kv(
    schedule: Schedule, hidden: int, kv_size: int, ex: float, ekv: float
) -> None:
    for batch, context in ((1, 512), (32, 2048), (8, 8192)):
        choice = solve_split(LayerShape(batch, context, hidden, kv_size, ex, ekv), H100, schedule, 16)
        assert choice.recompute_len == 0
        assert choice.predicted_s == choice.copy_all_s


@pytest.mark.parametrize(
    ("hidden", "bandwidth", "flops", "batch", "context"),
    [
        (4096, 32e9, 312e12, 32, 2048),  # the paper's constants: l*/s = 0.70
        (5120, 32e9, 312e12, 8, 1000),  # 0.66
        (7168, 32e9, 312e12, 1, 4096),  # 0.58
        (4096, 55e9, 720e12, 64, 3000),  # H100-like: 0.76
    ],
)
def test_solver_matches_mha_closed_form(hidden: int, bandwidth: float, flops: float, batch: int, context: int) -> None:
    profile = synthetic_profile([(MIB, bandwidth)], [(64, flops)], attention=())
    shape = LayerShape(batch, context, hidden, hidden, 2, 2)
    choice = solve_split(shape, profile, Schedule.SEQUENTIAL)
    expected = 1 / (1 + hidden * bandwidth / flops)
    assert abs(choice.recompute_len / context - expected) <= 1 / context
    assert choice.copy_all_s / choice.predicted_s == pytest.approx(1 / (1 - expected / 2), rel=2e-3)


def test_solver_reproduces_design_figures_for_opt_6_7b() -> None:
    shape = LayerShape(32, 2048, 4096, 4096, 2, 2)
    assert full_copy_s(shape, PAPER_H100) == pytest.approx(19.5e-3, rel=0.01)
    sequential = solve_split(shape, PAPER_H100, Schedule.SEQUENTIAL)
    assert sequential.recompute_len / 2048 == pytest.approx(0.76, abs=0.01)
    assert sequential.predicted_s == pytest.approx(12.1e-3, rel=0.01)
    chunked = solve_split(shape, PAPER_H100, Schedule.CHUNKED, num_chunks=16)
    assert chunked.recompute_len == 2048  # X is half of K,V: recompute everything
    assert chunked.predicted_s == pytest.approx(2048 * 32 * 4096 * 2 / PAPER_H100.h2d.rate(32 * MIB))  # X copy bound
    assert chunked.speedup > 1.85


def test_solver_respects_granularity() -> None:
    shape = LayerShape(32, 2050, 4096, 4096, 2, 2)
    choice = solve_split(shape, H100, Schedule.SEQUENTIAL, granularity=64)
    assert choice.recompute_len % 64 == 0 and choice.recompute_len / 2050 == pytest.approx(0.76, abs=0.03)
    assert solve_split(shape, H100, Schedule.CHUNKED, granularity=64).recompute_len == 2050  # s itself allowed
    with pytest.raises(KvprError):
        solve_split(shape, H100, Schedule.CHUNKED, granularity=0)


def test_resident_tokens() -> None:
    model = model_config(4096, 32, 8, num_layers=32)  # K,V: 2 * 1024 elements per token per layer
    per_token = 4 * 32 * 2 * 1024 * 2  # batch 4, fp16: 512 KiB per token
    assert resident_tokens(model, 4, 10_000, 1000 * per_token + 5 * MIB, 2, 5 * MIB) == 1000
    assert resident_tokens(model, 4, 10_000, 1000 * per_token + 5 * MIB - 1, 2, 5 * MIB) == 999
    assert resident_tokens(model, 4, 600, 1000 * per_token, 2, 0) == 600  # all fit
    assert resident_tokens(model, 4, 600, MIB, 2, 2 * MIB) == 0  # reserve exceeds free memory
    assert resident_tokens(model, 4, 10_000, 1000 * per_token, 0.5, 0) == 4000  # a 4-bit codec
    with pytest.raises(KvprError):
        resident_tokens(model, 0, 100, MIB, 2, 0)


# ---------------------------------------------------------------- plans


def test_plan_decode_step_is_consistent_and_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan is consistent with the cost model, and cheap enough to make every decode step: it
    evaluates the cost terms about a hundred times, not at each of the s + 1 splits (counted, not
    timed: a timing fails on a loaded CI machine, and 200 plans took 1.0-1.3 ms each here)."""
    opt = model_config(4096, 32, 32, num_layers=32, max_position=2048)
    plan = plan_decode_step(opt, 32, 2048, H100, 2, 2, Schedule.SEQUENTIAL, 16)
    assert isinstance(plan, SplitPlan)
    assert plan.recompute_len / 2048 == pytest.approx(0.76, abs=0.01) and plan.copy_len == 2048 - plan.recompute_len
    assert plan.predicted_full_copy_s == pytest.approx(19.5e-3, rel=0.01)
    assert plan.predicted_floor_s <= plan.predicted_s < plan.predicted_full_copy_s
    shape = LayerShape(32, 2048, 4096, 4096, 2, 2)
    assert plan.predicted_floor_s == floor_s(shape, H100, plan.recompute_len)
    evaluations = [0]
    seconds = TimeTerm.seconds

    def counted(term: TimeTerm, split: float) -> float:
        evaluations[0] += 1
        return seconds(term, split)

    monkeypatch.setattr(TimeTerm, "seconds", counted)
    for schedule in Schedule:
        counts = []
        for step in range(0, 200, 10):
            evaluations[0] = 0
            context = 2048 + 64 * step
            plan_decode_step(opt, 32, context, H100, 2, 2, schedule, 8)
            counts.append(evaluations[0])
            assert evaluations[0] < 0.02 * 3 * (context + 1)  # brute force: every term at every split
        assert statistics.median(counts) <= 150, counts


def with_host(layer_s: float, chunk_s: float) -> HardwareProfile:
    return dataclasses.replace(H100, host_layer_s={"none": layer_s}, host_chunk_s={"none": chunk_s})


def test_host_issue_time_chooses_the_chunk_count() -> None:
    """More chunks overlap better on the GPU but cost the host more: the plan weighs both."""
    opt = model_config(4096, 32, 32, num_layers=32, max_position=2048)
    free = plan_decode_step(opt, 32, 272, H100, 2, 2, Schedule.CHUNKED, None)
    assert free.recompute_len == 272 and free.num_chunks == 4  # the device's best: smaller chunks run slower
    costly = with_host(0.5e-3, 0.3e-3)
    plan = plan_decode_step(opt, 32, 272, costly, 2, 2, Schedule.CHUNKED, None)
    assert plan.recompute_len > 0.9 * 272 and plan.num_chunks < free.num_chunks
    shape = LayerShape(32, 272, 4096, 4096, 2, 2)
    for count in CHUNK_CHOICES:  # the chosen count is the best of them, and no better than its host time
        assert plan.predicted_s <= step_s(shape, costly, 272, Schedule.CHUNKED, count)
    assert plan.num_chunks == 2 and plan.predicted_s >= 0.5e-3 + plan.num_chunks * 0.3e-3
    fixed = plan_decode_step(opt, 32, 272, costly, 2, 2, Schedule.CHUNKED, 16)
    assert fixed.num_chunks == 16 and fixed.predicted_s > plan.predicted_s
    assert plan.step_split == StepSplit(plan.recompute_len, plan.num_chunks)


def test_a_chunk_dearer_than_the_copy_turns_recompute_off() -> None:
    opt = model_config(4096, 32, 32, num_layers=32, max_position=2048)
    plan = plan_decode_step(opt, 32, 272, with_host(1e-4, 0.1), 2, 2, Schedule.CHUNKED, None)
    assert (plan.recompute_len, plan.num_chunks) == (0, 1)
    assert plan.predicted_s == plan.predicted_full_copy_s  # the K,V copy outlasts the host's 0.1 ms


def test_host_issue_measurement_runs_on_the_executor() -> None:
    """The measurement behind the profile's host costs (CUDA in a profile) runs on any device: every
    X codec gets a layer and a chunk cost, finite and positive: the chunked steps recompute a prompt
    that lies on the host tier (with the prompt on a GPU tier they had no chunk to issue, and every
    chunk was measured free)."""
    layer_s, chunk_s, kv_chunk_s = profiler.host_issue_times(
        torch.device("cpu"), TINY, torch.float32, Progress(False), 3
    )
    assert set(layer_s) == set(chunk_s) == {"none", "int8", "int4"}
    assert all(math.isfinite(t) and t > 0 for t in (*layer_s.values(), *chunk_s.values(), kv_chunk_s))


def test_a_kv_codec_decode_is_compute_stream_work() -> None:
    """Under a K,V codec the landed parts are decoded on the compute stream, while the copy stream
    serves the next layer: T(0) = max(copy, decode), and a decode slower than the copy makes
    recomputing part of the tokens pay where the copy alone would not (4-bit K,V with scales:
    0.5625 B/elem, fp16 X: 2 B/elem, more than K,V)."""
    opt = model_config(4096, 32, 32, num_layers=32, max_position=2048)
    shape = LayerShape(16, 2016, 4096, 4096, 2, 0.5625, kv_codec="int4")
    plain = plan_decode_step(opt, 16, 2016, PAPER_H100, 0.5625, 2, Schedule.CHUNKED, 8, kv_codec="int4")
    assert plain.recompute_len == 0  # no decode timed: X is larger than the encoded K,V
    decode = RateCurve.from_points([(MIB, 2e9), (256 * MIB, 4e9)])
    slow = dataclasses.replace(PAPER_H100, kv_decode={"int4": decode})
    copy, decoding = kv_copy_s(shape, slow, 2016), shape.kv_bytes(2016) / decode.rate(shape.kv_bytes(2016))
    assert step_s(shape, slow, 0, Schedule.CHUNKED) == pytest.approx(max(copy, decoding))
    assert step_s(shape, slow, 0, Schedule.SEQUENTIAL) == pytest.approx(copy + decoding)
    decoded = plan_decode_step(opt, 16, 2016, slow, 0.5625, 2, Schedule.CHUNKED, 8, kv_codec="int4")
    assert decoded.recompute_len > 0 and decoded.predicted_s < decoded.predicted_full_copy_s
    assert step_s(dataclasses.replace(shape, kv_codec="int8"), slow, 0, Schedule.CHUNKED) == pytest.approx(copy)
    assert HardwareProfile.from_json(slow.to_json()) == slow
    assert HardwareProfile.from_json(with_host(1e-3, 1e-4).to_json()).host_issue().chunk_s == 1e-4


def test_format_plans_table() -> None:
    opt = model_config(4096, 32, 32, num_layers=32, max_position=2048)
    text = format_plans(opt, 32, [512, 2048], PAPER_H100, 2, 2, 16)
    row = next(line for line in text.splitlines() if " 2048 " in line)
    sequential = plan_decode_step(opt, 32, 2048, PAPER_H100, 2, 2, Schedule.SEQUENTIAL, 16)
    chunked = plan_decode_step(opt, 32, 2048, PAPER_H100, 2, 2, Schedule.CHUNKED, 16)
    for value in (
        sequential.predicted_full_copy_s * 1e3,
        sequential.predicted_s * 1e3,
        chunked.predicted_s * 1e3,
        chunked.predicted_floor_s * 1e3,
    ):
        assert f"{value:.3f}" in row
    assert "0.762" in row and "1.000" in row and "synthetic" in text


def test_format_plans_shows_the_three_tiers() -> None:
    """512 of 2048 tokens on the GPU: the split is over the 1536 host tokens, and the step also
    attends the GPU tier's; a context within the GPU tier has no host tier at all."""
    opt = model_config(4096, 32, 32, num_layers=32, max_position=4096)
    text = format_plans(opt, 32, [256, 2048], H100, 2, 2, 16, gpu_tokens=512)
    row = next(line for line in text.splitlines() if " 2048 " in line).split("│")
    cells = [cell.strip() for cell in row if cell.strip()]
    assert cells[:3] == ["2048", "512", "1536"]
    chunked = plan_decode_step(opt, 32, 1536, H100, 2, 2, Schedule.CHUNKED, 16, resident_len=512)
    assert f"{chunked.predicted_s * 1e3:.3f}" in cells and f"{chunked.recompute_len / 1536:.3f}" in cells
    short = [cell.strip() for cell in next(line for line in text.splitlines() if " 256 " in line).split("│")]
    attention_ms = H100.attention_s(256) * 1e3  # batch 32 = the profile's: the whole step
    assert [c for c in short if c][:4] == ["256", "256", "0", f"{attention_ms:.3f}"]


def test_attention_of_every_tier_is_compute_stream_work() -> None:
    """t_att over the GPU tier and the host tier: on the chunked schedule's compute branch, after
    both branches on the sequential one; it lowers l where compute is the busier stream."""
    shape = LayerShape(16, 2016, 4096, 4096, 2, 2, resident_len=1000)
    attend = H100.attention_s(3016) * 16 / H100.batch_size
    copy = kv_copy_s(shape, H100, 2016)
    assert attention_s(shape, H100) == pytest.approx(attend)
    assert step_s(shape, H100, 0, Schedule.CHUNKED) == pytest.approx(max(copy, attend))
    assert step_s(shape, H100, 0, Schedule.SEQUENTIAL) == pytest.approx(copy + attend)
    split = 600
    t_x, t_rc = x_copy_s(shape, H100, split, 4), recompute_s(shape, H100, split, 4)
    t_kv = kv_copy_s(shape, H100, 2016 - split)
    assert chunked_s(shape, H100, split, 4) == pytest.approx(max(t_x + t_kv, t_x / 4 + t_rc + attend))
    slow_attention = dataclasses.replace(H100, attention=((1024, 2e-3), (4096, 8e-3)))
    with_attention = solve_split(shape, slow_attention, Schedule.CHUNKED, 8)
    without = solve_split(shape, PAPER_H100, Schedule.CHUNKED, 8)
    assert with_attention.recompute_len < without.recompute_len
    gpu_only = LayerShape(16, 0, 4096, 4096, 2, 2, resident_len=3016)
    assert solve_split(gpu_only, H100, Schedule.CHUNKED, 8).predicted_s == pytest.approx(attend)
    assert attention_s(shape, PAPER_H100) == 0.0  # not timed: not counted


def test_streamed_copy_probe_times_slot_sized_copies_back_to_back() -> None:
    """The ring's copy pattern, timed as one: whole slots only (two at least), every repetition kept."""
    from kvpr.runtime.latency import SLOT_BYTES
    from kvpr.scheduler.profiler_timing import timer

    clock = timer(torch.device("cpu"), 0.0)
    host = torch.ones(3 * SLOT_BYTES + 5, dtype=torch.uint8)
    dev = torch.zeros(3 * SLOT_BYTES + 5, dtype=torch.uint8)
    samples = profiler._streamed_h2d(host, dev, clock)
    assert len(samples) == profiler.COPY_REPEATS and all(n == 3 * SLOT_BYTES and r > 0 for n, r in samples)
    assert bool(dev[: 3 * SLOT_BYTES].all()) and not bool(dev[3 * SLOT_BYTES :].any())  # whole slots only
    assert profiler._streamed_h2d(host[:SLOT_BYTES], dev, clock) == []  # one slot is no stream


def test_host_issue_counts_the_kv_chunks_of_the_split() -> None:
    """The profiled layer cost includes one K,V chunk: a split copying nothing issues none, one
    copying s - l tokens issues ceil((s - l) / slot) of them; the solver's bound on a range is never
    above the cost at any split in it."""
    from kvpr.scheduler.cost_model import HostIssue

    host = HostIssue(layer_s=1e-3, chunk_s=2e-4, kv_chunk_s=1e-4, kv_slot_tokens=64)
    assert host.seconds(288, 4, 288) == pytest.approx(1e-3 + 4 * 2e-4 - 1e-4)  # l = s: X chunks only
    assert host.seconds(0, 4, 288) == pytest.approx(1e-3 + 4 * 1e-4)  # 5 K,V chunks of <= 64 tokens
    assert host.seconds(100, 4, 288) == pytest.approx(1e-3 + 4 * 2e-4 + 2 * 1e-4)  # 188 tokens: 3 chunks
    assert HostIssue(1e-3, 2e-4).seconds(0, 4, 288) == 1e-3  # slot unknown (an older profile): one chunk
    for first in range(0, 289, 17):
        for last in range(first, 289, 23):
            bound = host.lower_bound(first, last, 4, 288)
            assert all(bound <= host.seconds(split, 4, 288) + 1e-15 for split in range(first, last + 1))


def test_costly_kv_chunks_make_the_solver_recompute_everything() -> None:
    """opt-6.7b's paper workload (32 x 272), X chunks dear to the host: with the K,V chunk's cost
    unknown (a format 5 profile, which charged one K,V chunk at every split) the plan keeps 12 tokens
    to copy; with it measured, l = s issues no K,V chunk and costs the host one chunk less, and the
    plan recomputes every token. The profile keeps the cost."""
    opt = model_config(4096, 32, 32, num_layers=32, max_position=2048)
    unknown = with_host(0.5e-3, 0.3e-3)
    costly = dataclasses.replace(unknown, host_kv_chunk_s=0.5e-3)
    shape = LayerShape(32, 272, 4096, 4096, 2, 2)
    host = costly.host_issue("none", 64)
    assert host.kv_chunks(272) == 5 and host.kv_chunks(0) == 0
    assert plan_decode_step(opt, 32, 272, unknown, 2, 2, Schedule.CHUNKED, None).recompute_len == 260
    plan = plan_decode_step(opt, 32, 272, costly, 2, 2, Schedule.CHUNKED, None)
    assert plan.recompute_len == 272
    assert plan.predicted_s <= step_s(shape, costly, 260, Schedule.CHUNKED, plan.num_chunks)
    assert HardwareProfile.from_json(costly.to_json()).host_kv_chunk_s == 0.5e-3
    older = json.loads(unknown.to_json()) | {"format_version": 5}
    del older["host_kv_chunk_s"]
    assert HardwareProfile.from_json(json.dumps(older)).host_kv_chunk_s == 0.0  # format 5: not measured
