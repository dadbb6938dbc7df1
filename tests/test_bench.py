"""The benchmark harness on a CPU: provenance refusals, medians with their range, the floor of the
plan that ran, and one timed row through the real executor (tiny model)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import H100, MIB, synthetic_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import floors  # noqa: E402
import provenance  # noqa: E402
from latency_systems import SYSTEMS, System, system_named  # noqa: E402
from spread import aggregate, spread  # noqa: E402

import bench_latency  # noqa: E402
from kvpr.api import LLM  # noqa: E402
from kvpr.cache.codec import make_x_codec  # noqa: E402
from kvpr.cache.storage import tier_codec  # noqa: E402
from kvpr.config import CacheConfig, EngineConfig, RuntimeConfig  # noqa: E402
from kvpr.models.registry import builtin_config  # noqa: E402
from kvpr.scheduler.cost_model import RateCurve  # noqa: E402
from kvpr.scheduler.profile import HardwareProfile  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# ---------------------------------------------------------------- provenance


def _git(repo: Path, *args: str) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A one-commit git repository with a results directory."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    return tmp_path


def test_git_commit_clean_then_dirty_refused_unless_allowed(repo: Path) -> None:
    head = _git(repo, "rev-parse", "HEAD")
    state = provenance.source_state(repo, env={})
    assert state == provenance.SourceState(head, False, "git") and len(head) == 40
    (repo / "benchmarks" / "results" / "latency-x.json").write_text("{}")  # a run's own output: still clean
    assert not provenance.source_state(repo, env={}).dirty
    header = provenance.results_header(False, peers=("surely-not-installed",), repo=repo, env={})
    assert header["commit"] == head and header["dirty"] is False and header["allow_dirty"] is False
    assert header["peers"] == {"surely-not-installed": None} and header["torch"] == torch.__version__
    assert header["device"] == "cpu" and header["driver"] is None and header["python"]
    (repo / "code.py").write_text("x = 2\n")
    with pytest.raises(provenance.ProvenanceError, match="--allow-dirty"):
        provenance.results_header(False, repo=repo, env={})
    allowed = provenance.results_header(True, repo=repo, env={})
    assert allowed["dirty"] is True and allowed["allow_dirty"] is True and allowed["commit"] == head
    (repo / "code.py").write_text("x = 1\n")
    (repo / "new.py").write_text("")  # untracked code travels to the device too: dirty
    assert provenance.source_state(repo, env={}).dirty


def test_env_fallback_without_git(tmp_path: Path) -> None:
    clean = {"KVPR_COMMIT": "abc1234", "KVPR_DIRTY": "0"}
    assert provenance.source_state(tmp_path, env=clean) == provenance.SourceState("abc1234", False, "env")
    assert provenance.results_header(False, repo=tmp_path, env=clean)["commit_source"] == "env"
    for env, problem in (
        ({}, "no commit"),
        ({"KVPR_COMMIT": "abc1234"}, "KVPR_DIRTY"),
        ({"KVPR_COMMIT": "abc1234", "KVPR_DIRTY": "1"}, "changes"),
        ({"KVPR_COMMIT": "abc1234", "KVPR_DIRTY": "maybe"}, "give 0"),
    ):
        with pytest.raises(provenance.ProvenanceError, match=problem):
            provenance.results_header(False, repo=tmp_path, env=env)
    unknown = provenance.results_header(True, repo=tmp_path, env={})
    assert unknown["commit"] == "unknown" and unknown["allow_dirty"] is True


def test_env_commit_must_agree_with_git(repo: Path) -> None:
    head = _git(repo, "rev-parse", "HEAD")
    assert provenance.source_state(repo, env={"KVPR_COMMIT": head[:7]}).commit == head
    with pytest.raises(provenance.ProvenanceError, match="git says HEAD"):
        provenance.source_state(repo, env={"KVPR_COMMIT": "0" * 40})


# ---------------------------------------------------------------- medians


def test_spread_and_aggregate() -> None:
    assert spread("t", [3.0, 1.0, 2.0]) == {"t": 2.0, "t_min": 1.0, "t_max": 3.0, "t_runs": [3.0, 1.0, 2.0]}
    assert spread("t", [4.0, 1.0])["t"] == 2.5
    assert spread("t", [])["t"] is None
    runs = [{"a": 1.0, "b": 10.0, "lens": [1]}, {"a": 5.0, "b": 30.0, "lens": [2]}, {"a": 3.0, "b": 20.0}]
    row = aggregate(runs, ("a", "b"))
    assert (row["a"], row["a_min"], row["a_max"], row["b"], row["b_runs"]) == (3.0, 1.0, 5.0, 20.0, [10.0, 30.0, 20.0])
    assert row["lens"] == [1] and row["repeats"] == 3  # untimed keys come from the first run


# ---------------------------------------------------------------- floors


def _measured(profile: HardwareProfile, hbm: float = 4e12) -> HardwareProfile:
    return dataclasses.replace(profile, d2d=RateCurve.from_points([(256 * MIB, hbm / 2)]))


def test_floor_of_int4_row_is_below_fp16_by_the_byte_ratio() -> None:
    """PCIe-bound (huge device rates): the floor scales with the stored bytes each step copies."""
    model, b = builtin_config("opt-6.7b"), 16
    profile = _measured(synthetic_profile([(MIB, 50e9)], [(16, 1e18)]), hbm=1e18)
    rates = floors.FloorRates.from_profile(profile)
    fp16 = floors.token_bytes(model, b, torch.float16, 13e9)
    int4 = floors.token_bytes(model, b, torch.float16, 13e9, kv_codec="int4")
    lens = [0] * 15
    ratio = floors.floor_ms(floors.tokenwise_work(int4, 2016, lens), rates) / floors.floor_ms(
        floors.tokenwise_work(fp16, 2016, lens), rates
    )
    codec = tier_codec("int4", model.head_dim)
    assert codec is not None
    expected = codec.bytes_per_token(b, model.num_kv_heads, model.head_dim) / (2 * b * model.kv_size * 2)
    assert ratio == pytest.approx(expected) and ratio < 0.35
    # every cached token's fp16 K,V at 50 GB/s, summed over layers, mean over steps
    s_mean = 2016 + 7
    assert floors.floor_ms(floors.copy_all_work(fp16, 2016, 15), rates) == pytest.approx(
        1e3 * model.num_layers * s_mean * 2 * b * model.kv_size * 2 / 50e9
    )


def test_floor_of_x4_row_counts_encoded_x_and_the_recompute() -> None:
    model, b = builtin_config("opt-6.7b"), 32
    profile = _measured(synthetic_profile([(MIB, 50e9)], [(16, 500e12)]), hbm=4e12)
    x4 = floors.token_bytes(model, b, torch.float16, 13e9, x_codec="int4")
    x_codec = make_x_codec("int4", model.hidden_size)
    assert x_codec is not None and x4.x_stored == x_codec.bytes_per_token(b, model.hidden_size)
    (step,) = floors.tokenwise_work(x4, 256, [200], host_lens=[240])
    layers = model.num_layers
    assert step.link_bytes == layers * (200 * x4.x_stored + (240 - 200) * x4.kv_stored)  # GPU tier: no PCIe
    assert step.recompute_flops == layers * 200 * b * 2 * model.hidden_size * 2 * model.kv_size
    assert step.device_bytes == 13e9 + layers * 257 * 2 * b * model.kv_size * 2
    rates = floors.FloorRates.from_profile(profile, "none")
    compute = step.device_bytes / 4e12 + step.recompute_flops / 500e12
    assert step.floor_s(rates) == pytest.approx(max(step.link_bytes / 50e9, compute))
    with pytest.raises(ValueError):
        floors.tokenwise_work(x4, 256, [250], host_lens=[240])


def test_floor_of_a_cache_method_uses_its_link_bytes() -> None:
    profile = _measured(synthetic_profile([(MIB, 50e9)], [(16, 1e15)]), hbm=4e12)
    rates = floors.FloorRates.from_profile(profile)
    steps = floors.counted_work(link_bytes=1e9, read_bytes=2e9, weight_bytes=13e9, num_steps=3)
    assert floors.floor_ms(steps, rates) == pytest.approx(1e3 * max(1e9 / 50e9, 15e9 / 4e12))
    fields = floors.floor_fields(floors.FloorKind.LINK_BYTES, steps, rates)
    assert fields["floor_kind"] == "link-bytes" and fields["floor_link_bytes_per_step"] == 1e9


def test_floor_rates_take_the_best_sample_and_refuse_without_device_memory() -> None:
    with pytest.raises(floors.FloorUnavailable, match="device-memory"):
        floors.FloorRates.from_profile(H100)  # no d2d: no invented constant
    best = dataclasses.replace(_measured(H100), h2d_samples={"registered": ((256 * MIB, 57e9), (MIB, 30e9))})
    rates = floors.FloorRates.from_profile(best)
    assert rates.h2d_bytes_per_s == 57e9 and rates.hbm_bytes_per_s == 4e12  # a copy moves its bytes twice
    read = dataclasses.replace(best, hbm_read=RateCurve.from_points([(256 * MIB, 4.5e12)]))
    assert read.hbm_bytes_per_s() == 4.5e12
    assert HardwareProfile.from_json(read.to_json()) == read


def test_committed_format_3_profiles_still_load() -> None:
    for path in sorted(RESULTS.glob("profile-*.json")):
        profile = HardwareProfile.load(path)
        if json.loads(path.read_text())["format_version"] == 3:
            assert profile.d2d is None and profile.hbm_bytes_per_s() is None
            assert profile.h2d_best() == profile.h2d.peak


# ---------------------------------------------------------------- the bench itself


def test_system_table_and_jobs() -> None:
    assert system_named("kvpr-0.25") == System("kvpr", floors.FloorKind.PLAN, recompute=0.25)
    assert system_named("kvpr-kvo-compile").cache_method and SYSTEMS["hf-offloaded"].floor_kind.value == "fp16-copy-all"
    with pytest.raises(ValueError):
        system_named("kvpr-nonsense")
    jobs = bench_latency.parse_jobs(["paper"], ["kvpr-off"], ["long16:kvpr-auto,floor"])
    assert [(case.prompt_len, systems) for case, systems in jobs] == [
        (256, ("kvpr-off",)),
        (2016, ("kvpr-auto", "floor")),
    ]
    with pytest.raises(SystemExit):
        bench_latency.parse_jobs([], [], ["paper:kvpr-bogus"])


def test_ratios_and_table_show_medians_and_floor() -> None:
    case = {"model": "m", "batch_size": 2, "prompt_len": 8, "gen_len": 4}
    rows = [
        {**case, "system": "kvpr-off", **spread("decode_ms_per_token", [10.0, 12.0, 11.0]), "floor_ms": 10.0},
        {**case, "system": "kvpr-auto", **spread("decode_ms_per_token", [5.0, 6.0, 7.0]), "floor_ms": 5.5},
        {**case, "system": "floor", "timed": False, "decode_ms_per_token": 5.5, "floor_ms": 5.5},
    ]
    bench_latency.add_ratios(rows)
    assert rows[0]["vs_floor"] == pytest.approx(1.1) and rows[1]["speedup_vs_kvpr_off"] == pytest.approx(11 / 6)
    assert "vs_floor" not in rows[2]
    assert "11.0 [10.0-12.0]" in bench_latency.markdown(rows)


def test_timed_row_on_a_tiny_model(tiny_checkpoint: Callable[[str], Path]) -> None:
    """Repeats through the real executor: medians, raw runs, the split of each step and its floor."""
    directory = tiny_checkpoint("opt")
    llm = LLM(EngineConfig(model=str(directory), cache=CacheConfig(), runtime=RuntimeConfig(device="cpu")))
    profile = _measured(synthetic_profile([(MIB, 1e9)], [(16, 1e9)], hidden=64, kv_width=128), hbm=1e10)
    case = bench_latency.Case("tiny", 2, 12, 4)
    weights = floors.decode_weight_bytes(llm.model, 4)
    floors_by_name = {}
    for name in ("kvpr-off", "kvpr-0.5", "kvpr-gpu", "kvpr-gpu-eager"):
        row = bench_latency.timed_row(llm, None, case, system_named(name), 2, profile, weights)
        assert row["repeats"] == 2 and len(row["decode_ms_per_token_runs"]) == 2
        assert row["decode_ms_per_token_min"] <= row["decode_ms_per_token"] <= row["decode_ms_per_token_max"]
        assert row["total_s"] > row["prefill_s"] > 0 and len(row["recompute_lens"]) == case.gen_len - 1
        assert row["floor_ms"] > 0
        floors_by_name[name] = row["floor_ms"]
        if name.startswith("kvpr-gpu"):  # --offload none: no host tier, a floor with no PCIe bytes
            assert row["floor_kind"] == "gpu-resident" and set(row["host_lens"]) == {0}
            assert row["floor_link_bytes_per_step"] == 0
            continue
        assert row["floor_kind"] == "plan" and set(row["host_lens"]) == {case.prompt_len}
        assert row["floor_link_bytes_per_step"] > 0
        if name == "kvpr-0.5":
            assert all(length > 0 for length in row["recompute_lens"]) and row["floor_recompute_flops_per_step"] > 0
    assert floors_by_name["kvpr-gpu"] <= floors_by_name["kvpr-off"]  # equal where the weight reads dominate


def test_floors_take_the_link_rate_the_run_demonstrated() -> None:
    """A row that moved 56 GB in a second shows the link does at least 56 GB/s: every row whose
    floor assumed the profiler's 50 GB/s is re-floored with 56 (never raised, the profile's floor
    kept beside it), a compute-bound row keeps its floor, and doing it twice changes nothing."""
    rates = {"h2d_bytes_per_s": 50e9, "hbm_bytes_per_s": 4e12, "recompute_flop_per_s": 600e12}

    def row(system: str, link: float, device: float, ms: float) -> dict:
        floor = 1e3 * max(link / 50e9, device / 4e12)
        return {"model": "m", "batch_size": 1, "prompt_len": 8, "system": system, "decode_ms_per_token": ms,
                "floor_ms": floor, "floor_kind": "plan", "floor_rates": dict(rates),
                "floor_link_bytes_per_step": link, "floor_device_bytes_per_step": device,
                "floor_recompute_flops_per_step": 0.0}  # fmt: skip

    fast, slow, bound = row("a", 56e9, 1e9, 1000.0), row("b", 28e9, 1e9, 600.0), row("c", 1e9, 4e12, 1100.0)
    untimed = {**row("floor", 100e9, 0.0, 1.0), "timed": False}  # the cost model's row is no measurement
    rows = [fast, slow, bound, untimed]
    assert floors.demonstrated_h2d(rows) == (56e9, "m 1 x 8 a")
    floors.floor_with_demonstrated_h2d(rows)
    assert fast["floor_ms"] == pytest.approx(1000.0) and fast["floor_ms_profile_h2d"] == pytest.approx(1120.0)
    assert slow["floor_ms"] == pytest.approx(500.0) and slow["floor_rates"]["h2d_bytes_per_s"] == 56e9
    assert bound["floor_ms"] == pytest.approx(1000.0)  # device bytes over HBM: the link rate does not move it
    assert slow["floor_h2d_source"] == "demonstrated by m 1 x 8 a"
    again = [dict(r) for r in rows]
    floors.floor_with_demonstrated_h2d(again)
    assert again == rows
