"""Memory is checked before anything is allocated: weights, the requested batch's cache and staging
against real free memory (the allocator's reusable blocks counted), a host budget no larger than the
machine, and throughput mode's searched policy always accepted by the run's own check."""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpr.api
import kvpr.device
from kvpr.api import LLM
from kvpr.cli import main
from kvpr.config import EngineConfig, ModelConfig, RuntimeConfig
from kvpr.device import DEVICE_FILL, GIB, check_device_memory, reusable_device_bytes
from kvpr.errors import KvprError
from kvpr.models.registry import builtin_config
from kvpr.placement import plan_throughput, with_throughput_plan
from kvpr.runtime.weights import LayerWeights
from kvpr.scheduler.profile import HardwareProfile
from kvpr.scheduler.throughput_bytes import ThroughputWorkload
from kvpr.scheduler.throughput_cost import MachineLimits, ThroughputPlan
from kvpr.scheduler.throughput_memory import block_memory, check_run_memory, run_needs
from kvpr.scheduler.throughput_policy import search_policy
from kvpr.throughput_config import ThroughputConfig, Tier

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
H200_OPT = RESULTS / "profile-opt-h4096-kv8192-float16-NVIDIA_H200-20261202.json"
H200_LLAMA = RESULTS / "profile-llama-h4096-kv2048-float16-NVIDIA_H200-20261202.json"
SMOLLM2 = ["--model", "smollm2-135m", "--dummy-weights", "--device", "cpu"]  # the default model's config


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any weight memory is allocated (the check must come first)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were built before the memory check")

    monkeypatch.setattr(kvpr.api, "init_dummy_weights", refuse)
    monkeypatch.setattr(kvpr.api, "load_weights", refuse)
    monkeypatch.setattr(LayerWeights, "allocate", refuse)


def _error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert time.perf_counter() - start < 30  # no weights built: seconds, not minutes
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpr: error: ") and "Traceback" not in captured.err
    return lines[0]


# ---------------------------------------------------------------- before the weights


@pytest.mark.parametrize(
    "placement",
    [
        [],
        ["--offload", "cpu", "--recompute", "0.5"],
        ["--mode", "throughput", "--percent", "100", "0", "0", "100", "100", "0", "--gpu-batch-size", "1000",
         "--num-gpu-batches", "100"],
    ],
    ids=["on-device", "offloaded", "throughput"],
)  # fmt: skip
def test_bench_huge_batch_fails_before_building_weights(placement: list[str], no_weights, capsys) -> None:
    """``bench --batch-size 100000`` built 5.3 GB of weights before its cache check."""
    line = _error_line(capsys, ["bench", *SMOLLM2, "--batch-size", "100000", *placement])
    assert "GiB of host memory" in line and "with the weights of smollm2-135m" in line


def test_real_checkpoint_is_not_read_before_the_check(tiny_checkpoint, no_weights, capsys) -> None:
    argv = ["bench", "--model", str(tiny_checkpoint("llama-gqa")), "--device", "cpu", "--batch-size", "10000000"]
    assert "GiB of host memory" in _error_line(capsys, [*argv, "--prompt-len", "100", "--gen-len", "100"])


def test_generate_checks_its_batch_with_the_weights(no_weights, capsys) -> None:
    """A stated budget that holds the weights (0.50 GiB) but not with 4 x 2000 slots of cache too."""
    prompts = [arg for _ in range(4) for arg in ("--prompt", "hi")]
    line = _error_line(capsys, ["generate", *SMOLLM2, *prompts, "--max-new-tokens", "2000", "--host-memory-gib", "0.7"])
    assert "b=4, 2001 slots" in line and "with the weights" in line
    with pytest.raises(KvprError, match="with the weights"):
        LLM(EngineConfig(model="smollm2-135m", dummy_weights=True, runtime=_cpu(0.7)), batch_size=4, max_len=2001)


def test_host_budget_above_the_machine_is_refused(no_weights, capsys, tmp_path: Path) -> None:
    """``--host-memory-gib 1000`` on a 24 GB machine started building 25.6 GB."""
    line = _error_line(capsys, ["bench", *SMOLLM2, "--host-memory-gib", "100000"])
    total = psutil.virtual_memory().total / GIB
    assert f"--host-memory-gib 100000 exceeds this machine's {total:.1f} GiB" in line
    # a plan for another machine (its profile and GPU size given) may state that machine's memory
    argv = ["plan", "--mode", "throughput", "--model", "opt-6.7b", "--profile", str(H200_OPT)]
    assert main([*argv, "--gpu-memory-gib", "139", "--host-memory-gib", "100000"]) == 0


def _cpu(budget_gib: float | None = None) -> RuntimeConfig:
    return RuntimeConfig(device="cpu", dtype="float32", host_memory_gib=budget_gib)


def test_stated_budget_counts_the_loaded_weights() -> None:
    """With --host-memory-gib, the weights already loaded (0.47 GiB) and the cache share one budget;
    the OS's available figure, used without a budget, already excludes them."""
    llm = LLM(EngineConfig(model="opt-125m", dummy_weights=True, runtime=_cpu(0.8)))
    llm.check_fits(4, 500)  # 0.11 GiB of cache
    with pytest.raises(KvprError, match=r"needs 0\.41 GiB of host memory but only 0\.33 GiB"):
        llm.check_fits(4, 1500)


# ---------------------------------------------------------------- the allocator's reusable memory


def test_freed_cache_held_by_the_allocator_counts_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """The H200 run: bench's warm-up freed a 76.5 GiB block cache to torch's allocator, the driver
    then reported 38.99 GiB free, and the timed run's identical cache was refused."""
    driver_free, reserved, allocated = 38.99 * GIB, 95.0 * GIB, 15.0 * GIB  # weights allocated, cache freed
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(driver_free), 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: int(allocated))
    monkeypatch.setattr(kvpr.device, "settle_device_memory", lambda device: None)  # no CUDA here to settle
    cuda = torch.device("cuda")
    check_device_memory(int(76.5 * GIB), cuda, "the block's cache")  # 118.99 GiB reusable
    with pytest.raises(KvprError, match=r"needs 120\.00 GiB of GPU memory but only 118\.99 GiB is free"):
        check_device_memory(120 * GIB, cuda, "the block's cache")
    assert reusable_device_bytes(10, 4, 6) == 10  # more allocated than reserved never counts negative


# ---------------------------------------------------------------- throughput: plan and check agree


def _run_checks(
    model: ModelConfig, plan: ThroughputPlan, gpu_free: float, host: float, workload: ThroughputWorkload
) -> None:
    """The checks a run of ``plan`` makes (``placement.check_block_fits``), in order, on a GPU with
    ``gpu_free`` bytes free before loading and a host budget of ``host`` bytes: before the weights
    load (everything), at the first block (weights held), at later blocks (layer buffers held too).
    The run's configuration is the one ``bench --policy auto`` builds (``with_throughput_plan``)."""
    config = with_throughput_plan(EngineConfig(model=None, throughput=ThroughputConfig()), plan)
    assert config.cache.stores_inputs == (plan.recompute_fraction > 0)  # r = 0 stores no X
    assert config.throughput is not None
    memory = block_memory(
        model, config.throughput, plan.config.block_size, workload.max_len, config.cache.stores_inputs, 2
    )
    weights = memory[Tier.GPU]["resident weights"] + memory[Tier.GPU]["layer weights"]
    buffers, host_weights = memory[Tier.GPU]["weight buffers"], memory[Tier.CPU]["layer weights"]
    stages = [
        (False, False, gpu_free, host),
        (True, False, gpu_free - weights, host - host_weights),
        (True, True, gpu_free - weights - buffers, host - host_weights),
    ]
    for loaded, buffers_made, free_gpu, free_host in stages:
        needs = run_needs(memory, loaded, buffers_made)
        check_run_memory(needs, {Tier.GPU: DEVICE_FILL * free_gpu, Tier.CPU: free_host}, "the planned block")


MODELS = ["opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "llama-3-8b", "qwen2-7b", "mistral-7b"]


@st.composite
def llama_configs(draw: st.DrawFn) -> ModelConfig:
    heads = draw(st.sampled_from([8, 16, 32, 64]))
    head_dim = draw(st.sampled_from([64, 128]))
    hidden = heads * head_dim
    return ModelConfig.from_hf(
        {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": hidden * draw(st.integers(2, 4)),
            "num_hidden_layers": draw(st.integers(2, 64)),
            "num_attention_heads": heads,
            "num_key_value_heads": heads // draw(st.sampled_from([1, 2, 8])),
            "vocab_size": draw(st.integers(1000, 160000)),
            "max_position_embeddings": 4096,
            "tie_word_embeddings": draw(st.booleans()),
        }
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from(MODELS).map(builtin_config) | llama_configs(),
    gpu_gib=st.floats(4.0, 141.0),
    host_gib=st.floats(8.0, 512.0),
    prompt_len=st.integers(16, 1500),
    gen_len=st.integers(2, 256),
    allow_recompute=st.booleans(),
)
def test_every_searched_policy_passes_the_runs_check(
    model: ModelConfig, gpu_gib: float, host_gib: float, prompt_len: int, gen_len: int, allow_recompute: bool
) -> None:
    """The search plans within DEVICE_FILL of the GPU memory free before loading (as plan_throughput
    builds its limits) and counts every item of the run's check with the same formula, so whatever
    it returns, the run accepts at every stage."""
    workload = ThroughputWorkload(prompt_len, gen_len)
    gpu, host = gpu_gib * GIB, host_gib * GIB
    limits = MachineLimits(DEVICE_FILL * gpu, host, 0.0, 1e9, 1e9)
    try:
        plan = search_policy(
            model, HardwareProfile.load(H200_OPT), limits, workload, allow_recompute=allow_recompute, dtype_bytes=2
        )
    except KvprError:
        return  # nothing fits this machine: nothing to run
    _run_checks(model, plan, gpu, host, workload)


def test_h200_block_of_512_rows_runs_after_its_warm_up() -> None:
    """The reported case: llama-3-8b on the H200 (139 GiB free) plans a block of 512 rows with 80 GiB
    of cache. bench's warm-up run leaves its peak freed inside torch's allocator; the timed run's
    check must still accept the same block (it refused it: "only 38.99 GiB is free")."""
    config = EngineConfig(model="llama-3-8b", runtime=RuntimeConfig(profile_path=str(H200_LLAMA), host_memory_gib=200))
    model, workload, gpu = builtin_config("llama-3-8b"), ThroughputWorkload(256, 1024), 139 * GIB
    plan = plan_throughput(config, workload.prompt_len, workload.gen_len, gpu_memory_gib=139)
    assert plan.config.block_size == 512 and plan.memory_items["gpu"]["kv cache"] > 64 * GIB
    _run_checks(model, plan, gpu, 200 * GIB, workload)
    memory = block_memory(model, plan.config, plan.config.block_size, workload.max_len, False, 2)
    held = sum(memory[Tier.GPU][item] for item in ("resident weights", "layer weights", "weight buffers"))
    block = run_needs(memory, True, True)[Tier.GPU]
    reserved = plan.memory_bytes["gpu"]  # the warm-up's peak, now freed to the allocator but the weights
    driver_free = gpu - reserved
    assert block > DEVICE_FILL * driver_free  # the driver's figure alone refuses it (the bug)
    free = reusable_device_bytes(int(driver_free), int(reserved), int(held))
    check_run_memory({Tier.GPU: block}, {Tier.GPU: DEVICE_FILL * free}, "the timed block")


@settings(max_examples=40, deadline=None)
@given(budget=st.floats(0.5, 60.0), batch=st.integers(1, 256), max_len=st.integers(64, 2048))
def test_offload_auto_never_plans_beyond_the_gpu_budget(budget: float, batch: int, max_len: int) -> None:
    """On an (emulated) 141 GB GPU with 0.3 GiB held: ``--offload auto --gpu-memory-gib N`` sizes the
    GPU tier so that the tier, its rings and the workspace reserve stay within N; the whole cache
    on the GPU where it fits, else tiers; the memory check refuses a placement beyond N (within
    opt-125m's 2048 positions)."""
    import unittest.mock as mock

    from kvpr.cache.storage import CacheShape
    from kvpr.config import CacheConfig, Offload
    from kvpr.placement import Target, cache_bytes, check_cache_fits, tier_plan, usable_device_bytes

    model = builtin_config("opt-125m")
    cuda = torch.device("cuda")

    def target(offload: Offload, resident: int | str = "auto") -> Target:
        cache = CacheConfig(offload=offload, recompute=0.5, gpu_resident=resident)
        return Target(model, "opt-125m", cuda, torch.float16, cache, None, None, None, budget)

    shape = CacheShape.for_model(model, batch, max_len, torch.float16)
    with (
        mock.patch("kvpr.placement.free_device_bytes", return_value=140 * GIB),
        mock.patch("kvpr.device.free_device_bytes", return_value=140 * GIB),
        mock.patch("torch.cuda.memory_allocated", return_value=int(0.3 * GIB)),
    ):
        auto = target(Offload.AUTO)
        usable = usable_device_bytes(auto)
        assert usable == pytest.approx(max(0.0, DEVICE_FILL * (budget - 0.3) * GIB), abs=2)
        plan = tier_plan(auto, shape)
        device_bytes, _, _ = cache_bytes(auto, shape)
        with mock.patch("kvpr.placement.check_host_memory"):  # the host share is not the question
            if plan is None:  # all on the GPU: only when the whole cache is within the budget
                assert shape.kv_bytes() <= usable
            else:  # tiers: a prefix only as large as fits; the tail (one flush block) in any case
                assert plan.offloads and plan.prefix_cap < max_len
                if device_bytes > usable:  # not even the tail and rings fit: refused, in one line
                    with pytest.raises(KvprError, match="--gpu-memory-gib"):
                        check_cache_fits(auto, shape, weight_bytes=0)
            too_many = target(Offload.CPU, resident=max_len)  # every token's K,V kept on the GPU by hand
            if shape.kv_bytes() > usable:
                with pytest.raises(KvprError, match="--gpu-memory-gib"):
                    check_cache_fits(too_many, shape, weight_bytes=0)


@pytest.mark.parametrize("tokens", [1, 64, 700, 2047])
def test_usable_bytes_for_tokens_inverts_the_gpu_token_capacity(tokens: int) -> None:
    """What bench_tiered budgets from: the usable bytes ``usable_bytes_for_tokens`` names give back
    exactly that many resident tokens under ``--offload auto`` (the inverse sits beside the formula)."""
    import unittest.mock as mock

    from kvpr.cache.storage import CacheShape
    from kvpr.config import CacheConfig, Offload
    from kvpr.placement import Target, gpu_token_capacity, usable_bytes_for_tokens

    model = builtin_config("opt-125m")
    shape = CacheShape.for_model(model, 16, 2048, torch.float16)
    budget = usable_bytes_for_tokens(shape, tokens) / DEVICE_FILL / GIB
    cache = CacheConfig(offload=Offload.AUTO, gpu_resident="auto")
    target = Target(model, "opt-125m", torch.device("cuda"), torch.float16, cache, None, None, None, budget)
    with (
        mock.patch("kvpr.placement.free_device_bytes", return_value=140 * GIB),
        mock.patch("torch.cuda.memory_allocated", return_value=0),
    ):
        assert gpu_token_capacity(target, shape) == tokens
