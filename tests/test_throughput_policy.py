"""Throughput-mode policy: placement rules, the cost of a fixed policy, and the LP search against brute force."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpr.config import ModelConfig
from kvpr.errors import KvprError
from kvpr.models.registry import builtin_config, model_class
from kvpr.scheduler import throughput_policy as policy_internals
from kvpr.scheduler.cost_model import RateCurve
from kvpr.scheduler.profile import HardwareProfile
from kvpr.scheduler.throughput_bytes import (
    Shares,
    ThroughputWorkload,
    cache_slot_ranges,
    layer_weight_tensors,
    resident_weight_elements,
    weight_shares,
)
from kvpr.scheduler.throughput_cost import (
    MachineLimits,
    ThroughputPlan,
    block_costs,
    cost_terms,
    estimate,
)
from kvpr.scheduler.throughput_policy import flexgen_policy, format_plans, search_policy
from kvpr.throughput_config import Placement, ThroughputConfig, Tier

GIB = 1 << 30
MIB = 1 << 20
OPT = builtin_config("opt-6.7b")
LLAMA3 = builtin_config("llama-3-8b")
WORKLOAD = ThroughputWorkload(prompt_len=512, gen_len=32)
SMALL_GRID: dict[str, Any] = {"gpu_batch_sizes": (4, 16, 64), "num_gpu_batches": (1, 4, 16)}


def profile_for(model: ModelConfig, h2d: float = 25e9) -> HardwareProfile:
    """A PCIe 4 host with an A100-class GPU, written out as test data: flat pinned copies; GEMMs
    memory-bound at small M (rate ~ M) up to 300 TFLOP/s; decode attention measured at batch 32."""
    return HardwareProfile(
        device_name="synthetic",
        torch_version="0",
        h2d=RateCurve.from_points([(MIB, h2d)]),
        d2h=RateCurve.from_points([(MIB, h2d)]),
        gemm=RateCurve.from_points([(1, 3e12), (16, 48e12), (128, 300e12)]),
        gemm_hidden=model.hidden_size,
        gemm_kv_width=2 * model.kv_size,
        batch_size=32,
        attention=((512, 1e-4), (2048, 3.5e-4)),
        decode_layer_s=1e-4,
    )


def limits(gpu_gib: float, cpu_gib: float, disk_gib: float = 0.0) -> MachineLimits:
    return MachineLimits(gpu_gib * GIB, cpu_gib * GIB, disk_gib * GIB, disk_read_bps=2e9, disk_write_bps=1e9)


def fits(plan: ThroughputPlan, machine: MachineLimits) -> bool:
    return all(plan.memory_bytes[tier.value] <= machine.capacity(tier) for tier in Tier)


# ---------------------------------------------------------------- shapes and placement rules


@pytest.mark.parametrize("name", ["opt-125m", "smollm2-135m", "qwen2-7b"])
def test_layer_tensors_and_resident_weights_match_the_models(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = builtin_config(name)
    monkeypatch.setattr(torch.nn.Embedding, "reset_parameters", lambda self: None)  # normal_ on meta: slow, unneeded
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    layer = [(n, tuple(p.shape)) for n, p in model.decoder_layers[0].named_parameters()]
    assert list(layer_weight_tensors(cfg)) == layer
    tied = set(model.tied_parameters())
    outside = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n and n not in tied)
    assert resident_weight_elements(cfg) == outside


def test_weight_shares_follow_flexgens_midpoint_rule() -> None:
    # OPT layer: q, k, v, out (1/12 each), LN, fc1 and fc2 (1/3 each), LN; fc1's middle is just below 50%
    gpu_49 = weight_shares(OPT, Placement(49, 51, 0, 100, 100, 0))
    assert gpu_49[0] == pytest.approx(1 / 3, abs=1e-3) and sum(gpu_49) == 1.0
    assert weight_shares(OPT, Placement(50, 50, 0, 100, 100, 0))[0] == pytest.approx(2 / 3, abs=1e-3)
    assert weight_shares(OPT, Placement(100, 0, 0, 100, 100, 0)) == (1.0, 0.0, 0.0)
    assert weight_shares(OPT, Placement(0, 0, 0, 100, 100, 0)) == (0.0, 0.0, 1.0)
    shares = [weight_shares(OPT, Placement(p, 100 - p, 0, 100, 100, 0))[0] for p in range(101)]
    assert shares == sorted(shares)


def test_cache_slots_are_token_ranges_and_activations_live_whole() -> None:
    assert cache_slot_ranges(Placement(100, 0, 25, 50, 100, 0), 544) == (136, 408)
    assert cache_slot_ranges(Placement(100, 0, 0, 100, 100, 0), 544) == (0, 544)
    assert [Placement(100, 0, 0, 100, hg, hc).activation_tier for hg, hc in ((60, 40), (50, 50), (10, 30))] == [
        Tier.GPU,
        Tier.CPU,
        Tier.DISK,
    ]


def test_limits_and_workload_are_validated() -> None:
    with pytest.raises(KvprError, match="gpu_bytes=0"):
        MachineLimits(0, GIB, 0, 1e9, 1e9)
    with pytest.raises(KvprError, match="disk_read_bps"):
        MachineLimits(GIB, GIB, 0, 0, 1e9)
    with pytest.raises(KvprError, match="cpu_bytes"):
        MachineLimits(GIB, -1, 0, 1e9, 1e9)
    with pytest.raises(KvprError, match="gen_len=0"):
        ThroughputWorkload(8, 0)
    assert WORKLOAD.max_len == 544 and WORKLOAD.decode_steps == 31 and WORKLOAD.mean_context == 527


# ---------------------------------------------------------------- a fixed policy


def test_estimate_counts_bytes_and_names_the_overflowing_tier() -> None:
    profile, machine = profile_for(OPT), limits(40, 200)
    config = ThroughputConfig(Placement(100, 0, 0, 100, 100, 0), gpu_batch_size=8, num_gpu_batches=2)
    plan = estimate(OPT, profile, machine, WORKLOAD, config, 0.0)
    kv_cache = OPT.num_layers * 16 * 544 * 2 * OPT.kv_size * 2  # layers * sequences * slots * K,V * fp16
    assert plan.memory_items["cpu"]["kv cache"] == kv_cache
    assert plan.memory_items["gpu"]["weight buffers"] == 0  # every weight on the GPU
    assert plan.tokens_per_s == pytest.approx(16 * 32 / (plan.prefill_s + plan.decode_s))
    assert plan.decode_tokens_per_s == pytest.approx(16 * 31 / plan.decode_s)
    with_x = estimate(OPT, profile, machine, WORKLOAD, config, 0.5)
    assert with_x.memory_items["cpu"]["kv cache"] == 1.5 * kv_cache  # X (h) beside K,V (2h) for every token
    assert with_x.layer_terms_s["decode"]["h2d"] < plan.layer_terms_s["decode"]["h2d"]
    assert with_x.layer_terms_s["decode"]["compute"] > plan.layer_terms_s["decode"]["compute"]
    with pytest.raises(KvprError, match=r"GiB of gpu memory, 12\.00 GiB available \(.* GiB over\)"):
        estimate(OPT, profile, limits(12, 200), WORKLOAD, config, 0.0)
    with pytest.raises(KvprError, match="GiB of cpu memory"):
        estimate(OPT, profile, limits(40, 1), WORKLOAD, config, 0.0)
    with pytest.raises(KvprError, match="recompute fraction"):
        estimate(OPT, profile, machine, WORKLOAD, config, 1.5)


# ---------------------------------------------------------------- the search


@settings(max_examples=25, deadline=None)
@given(
    shares=st.tuples(*[st.floats(0, 1)] * 4),
    act=st.sampled_from([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]),
    prompt=st.sampled_from([64, 512, 1024]),
    gen=st.sampled_from([2, 8, 512]),
    stores_x=st.booleans(),
)
def test_lp_token_relaxation_is_exact(
    shares: tuple[float, float, float, float], act: tuple[float, float, float], prompt: int, gen: int, stores_x: bool
) -> None:
    """With the placement pinned, the LP's bounded token counts (and its free r) give exactly the best
    cost of the true token-range counts over a fine grid of r: demoting tokens never pays."""
    machine, workload = limits(1000, 1000, 1000), ThroughputWorkload(prompt, gen)
    block = block_costs(OPT, profile_for(OPT), machine, workload, 8, 4, stores_x, 2)
    wg, wc, cg, cc = shares[0], shares[1] * (1 - shares[0]), shares[2], shares[3] * (1 - shares[2])
    fixed = dict(wg=wg, wc=wc, wd=1 - wg - wc, cg=cg, cc=cc, cd=1 - cg - cc, ag=act[0], ac=act[1], ad=act[2])
    solution = policy_internals._solve(block, machine, True, fixed)
    assert solution is not None
    s_max, mean, s0 = workload.max_len, workload.mean_context, workload.prompt_len
    gpu_end, cpu_end = cg * s_max, (cg + cc) * s_max
    tg, tc = min(mean, gpu_end) / mean, (min(mean, cpu_end) - min(mean, gpu_end)) / mean
    pg, pc = min(s0, gpu_end) / s0, (min(s0, cpu_end) - min(s0, gpu_end)) / s0
    best = 0.0
    for r in [step / 100 for step in range(101)] if stores_x else [0.0]:
        placement = (wg, wc, 1 - wg - wc, cg, cc, 1 - cg - cc, *act)
        counts = (tg, r * tc, (1 - r) * tc, 1 - tg - tc, pg, pc, 1 - pg - pc)
        terms = cost_terms(block, Shares(*placement, *counts, 1.0))
        layers = max(terms.prefill.values()) + workload.decode_steps * max(terms.decode.values())
        seconds = OPT.num_layers * layers + gen * block.head_s
        best = max(best, block.block_size * gen / seconds)
    assert solution.bound_tokens_per_s >= best * (1 - 1e-7)
    assert solution.bound_tokens_per_s <= best * (1 + 1e-3)  # r on a 1% grid against the LP's free r


def brute_force(model: ModelConfig, machine: MachineLimits, gbs: int, ngb: int, disk: bool) -> float:
    """The best estimate over a coarse grid of placements and recompute fractions."""
    profile, best = profile_for(model), 0.0
    step = 20 if disk else 10
    for wg, wc, cg, cc in itertools.product(range(0, 101, step), repeat=4):
        if wg + wc > 100 or cg + cc > 100 or (not disk and (wg + wc < 100 or cg + cc < 100)):
            continue
        for act, r in itertools.product(((100, 0), (0, 100)), (0.0, 0.5, 1.0)):
            config = ThroughputConfig(Placement(wg, wc, cg, cc, *act), gbs, ngb, offload_dir="/tmp")
            try:
                best = max(best, estimate(model, profile, machine, WORKLOAD, config, r).tokens_per_s)
            except KvprError:
                continue
    return best


@pytest.mark.parametrize(
    ("machine", "gbs", "ngb"),
    [
        (limits(16, 64), 16, 4),  # weights fill the GPU, the cache is on the CPU
        (limits(24, 20), 32, 2),  # the cache overflows the CPU: some of it must stay on the GPU
        (limits(10, 200), 8, 8),  # weights do not fit: some stream from the CPU every block
        (limits(14, 12, 400), 16, 8),  # the disk tier takes what fits nowhere else
    ],
)
def test_search_matches_brute_force(machine: MachineLimits, gbs: int, ngb: int) -> None:
    disk = machine.disk_bytes > 0
    best = brute_force(OPT, machine, gbs, ngb, disk)
    assert best > 0
    plan = search_policy(
        OPT, profile_for(OPT), machine, WORKLOAD, gpu_batch_sizes=(gbs,), num_gpu_batches=(ngb,),
        offload_dir="/tmp" if disk else None,
    )  # fmt: skip
    assert plan.bound_tokens_per_s is not None
    assert plan.bound_tokens_per_s >= best * (1 - 1e-6)  # the LP's optimum bounds every placement
    assert plan.tokens_per_s <= plan.bound_tokens_per_s * (1 + 1e-6)
    assert plan.tokens_per_s >= best * (1 - 1e-3)  # integer percentages beat a 10%-step grid
    assert fits(plan, machine)
    again = estimate(OPT, profile_for(OPT), machine, WORKLOAD, plan.config, plan.recompute_fraction)
    assert again.tokens_per_s == plan.tokens_per_s and again.memory_bytes == plan.memory_bytes


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gpu=st.floats(8, 80),
    cpu=st.floats(4, 256),
    disk=st.sampled_from([0.0, 500.0]),
    prompt=st.sampled_from([128, 512, 1024]),
    gen=st.sampled_from([1, 8, 128]),
    opt=st.booleans(),
)
def test_search_fits_memory_and_recompute_never_loses(
    gpu: float, cpu: float, disk: float, prompt: int, gen: int, opt: bool
) -> None:
    model, machine = (OPT if opt else LLAMA3), limits(gpu, cpu, disk)
    workload, offload_dir = ThroughputWorkload(prompt, gen), ("/tmp" if disk else None)
    try:
        baseline = flexgen_policy(model, profile_for(model), machine, workload, **SMALL_GRID, offload_dir=offload_dir)
    except KvprError as error:
        assert "no throughput policy fits" in str(error)
        return
    plan = search_policy(model, profile_for(model), machine, workload, **SMALL_GRID, offload_dir=offload_dir)
    assert fits(plan, machine) and fits(baseline, machine)
    assert baseline.recompute_fraction == 0.0
    assert plan.tokens_per_s >= baseline.tokens_per_s  # r = 0 is in kvpr's search space
    assert plan.config.placement.uses_disk <= (disk > 0)


def test_gqa_never_recomputes() -> None:
    """Llama-3-8B: X (h = 4096) is twice K,V (2 * 1024): the search must find r = 0 by itself, also where
    the cache crosses PCIe every step and decode waits on it."""
    profile = profile_for(LLAMA3, h2d=12e9)
    for machine in (limits(12, 256), limits(10, 128), limits(40, 256)):
        plan = search_policy(LLAMA3, profile, machine, WORKLOAD, **SMALL_GRID)
        slots = plan.config.block_size * 544 * plan.config.placement.cache_cpu / 100
        kv_only = LLAMA3.num_layers * slots * 2 * LLAMA3.kv_size * 2  # no X stored beside K,V
        assert plan.recompute_fraction == 0.0
        assert plan.memory_items["cpu"]["kv cache"] == pytest.approx(kv_only, rel=0.01)
        assert plan.tokens_per_s == flexgen_policy(LLAMA3, profile, machine, WORKLOAD, **SMALL_GRID).tokens_per_s
        if machine.gpu_bytes < 16 * GIB:
            assert plan.config.placement.cache_cpu > 50 and plan.breakdown["decode"] == "h2d"


def test_opt_with_the_cache_on_the_cpu_recomputes() -> None:
    """OPT-6.7B on a 10 GiB GPU: weights and cache cross PCIe every step, X is half of K,V."""
    profile, machine, grid = profile_for(OPT), limits(10, 200), ((2, 8, 32), (16, 64, 128))
    plan = search_policy(OPT, profile, machine, WORKLOAD, gpu_batch_sizes=grid[0], num_gpu_batches=grid[1])
    baseline = flexgen_policy(OPT, profile, machine, WORKLOAD, gpu_batch_sizes=grid[0], num_gpu_batches=grid[1])
    assert plan.recompute_fraction > 0 and plan.config.placement.cache_cpu > 50
    assert baseline.breakdown["decode"] == "h2d"
    assert plan.tokens_per_s > 1.05 * baseline.tokens_per_s
    assert plan.decode_tokens_per_s > baseline.decode_tokens_per_s


def test_more_gpu_memory_never_lowers_throughput() -> None:
    profile, previous = profile_for(OPT), 0.0
    for gpu in (9, 12, 14, 20, 48):
        plan = search_policy(OPT, profile, limits(gpu, 64), WORKLOAD, **SMALL_GRID)
        assert plan.tokens_per_s >= previous * (1 - 1e-9), gpu
        previous = plan.tokens_per_s


def test_nothing_fits_names_the_tier() -> None:
    profile = profile_for(OPT)
    with pytest.raises(KvprError, match=r"no throughput policy fits: .* CPU \(pass offload_dir"):
        search_policy(OPT, profile, limits(8, 0.5), WORKLOAD, **SMALL_GRID)
    with pytest.raises(KvprError, match="no throughput policy fits: .* GiB of GPU memory"):
        search_policy(OPT, profile, limits(0.5, 256), WORKLOAD, **SMALL_GRID)
    with pytest.raises(KvprError, match="at least one GPU batch size"):
        search_policy(OPT, profile, limits(40, 256), WORKLOAD, gpu_batch_sizes=())
    with pytest.raises(KvprError, match="exceed the model's context"):
        search_policy(OPT, profile, limits(40, 256), ThroughputWorkload(2040, 32))


def test_format_and_to_dict() -> None:
    profile, machine = profile_for(OPT), limits(16, 200)
    plans = [("kvpr", search_policy(OPT, profile, machine, WORKLOAD, **SMALL_GRID))]
    plans.append(("flexgen", flexgen_policy(OPT, profile, machine, WORKLOAD, **SMALL_GRID)))
    table = format_plans(plans)
    assert "kvpr" in table and "flexgen" in table and str(plans[0][1].config.placement) in table
    data = json.loads(json.dumps(plans[0][1].to_dict()))
    assert data["percent"] == list(plans[0][1].config.placement.as_percent())
    assert math.isclose(data["tokens_per_s"], plans[0][1].tokens_per_s)
    assert set(data["memory_bytes"]) == {"gpu", "cpu", "disk"}
