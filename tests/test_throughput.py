"""Throughput mode: every placement of weights, cache and activations (disk in a temporary
directory) and every split gives the same greedy tokens as the GPU-resident latency run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import cpu_llm
from kvpr.api import LLM
from kvpr.cache.disk import DiskQueue, DiskTensor
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig, SamplingParams
from kvpr.errors import KvprError
from kvpr.throughput_config import CacheSplit, Placement, ThroughputConfig, Tier, tier_at

PROMPTS = [[5, 17, 33, 2, 90, 11], [7, 7, 61], [100, 3, 44, 21, 9, 8, 71, 12, 4], [1, 2, 3], [9, 9]]

# (--percent, recompute): all on GPU, FlexGen's paper placement, a bit of every tier, all on disk.
PLACEMENTS = [
    ("100 0 100 0 100 0", "off"),
    ("0 100 0 100 0 100", "off"),
    ("0 100 0 100 0 100", 0.5),
    ("30 30 30 30 30 30", 1.0),
    ("50 20 40 30 0 50", 0.3),
    ("0 0 0 0 0 0", "off"),
]


def throughput_llm(
    directory: Path | str, percent: str, recompute: object, gbs: int, ngb: int, offload_dir: Path
) -> LLM:
    return LLM(
        EngineConfig(
            model=str(directory),
            cache=CacheConfig(offload=Offload.CPU, recompute=recompute),  # type: ignore[arg-type]
            runtime=RuntimeConfig(device="cpu", dtype="float32", num_chunks=3),
            throughput=ThroughputConfig(Placement.parse(percent.split()), gbs, ngb, offload_dir=str(offload_dir)),
        )
    )


@pytest.mark.parametrize("family", ["opt", "llama-gqa"])
@pytest.mark.parametrize(("percent", "recompute"), PLACEMENTS)
def test_every_placement_matches_latency_mode(tiny_checkpoint, tmp_path, family, percent, recompute) -> None:
    directory = tiny_checkpoint(family)
    params = SamplingParams(max_new_tokens=9, stop_on_eos=False)
    reference = [c.token_ids for c in cpu_llm(directory).generate(PROMPTS, params)]
    # 2 GPU batches of 2 and one of 1 in one block; then blocks of 2 run one after another.
    for gbs, ngb in [(2, 3), (2, 1)]:
        llm = throughput_llm(directory, percent, recompute, gbs, ngb, tmp_path)
        assert [c.token_ids for c in llm.generate(PROMPTS, params)] == reference, (gbs, ngb)
        if recompute not in ("off", 0.0):
            assert max(llm.last_stats.recompute_lens) > 0


def test_scores_match_latency_mode(tiny_checkpoint, tmp_path) -> None:
    """Teacher-forced log-probabilities through the block schedule equal the resident run's."""
    directory = tiny_checkpoint("opt")
    sequences = [[5, 17, 33, 2, 90, 11, 4, 8], [7, 7, 61, 3, 9, 12, 40, 2]]
    reference = cpu_llm(directory).score(sequences, prefix_len=3)
    llm = throughput_llm(directory, "30 30 30 30 30 30", 0.5, 1, 2, tmp_path)
    torch.testing.assert_close(llm.score(sequences, prefix_len=3), reference, rtol=1e-5, atol=1e-5)


def test_disk_tier_leaves_no_files(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    llm = throughput_llm(tiny_checkpoint("opt"), "0 0 0 0 0 0", "off", 2, 1, tmp_path)
    executors = []  # kept alive past the run: its files must go with the run, not with the executor
    make_executor = LLM.make_executor
    monkeypatch.setattr(LLM, "make_executor", lambda *args: executors.append(make_executor(*args)) or executors[-1])
    llm.generate(PROMPTS[:2], SamplingParams(max_new_tokens=3, stop_on_eos=False))
    assert executors
    disk_dir = llm._offload_dir()
    assert disk_dir is not None and disk_dir.parent == tmp_path
    assert [p.name for p in disk_dir.iterdir()] == ["weights.bin"]  # the cache files went with the run
    llm.score([list(range(5, 13))] * 2, 4)  # teacher forcing: the same for its own run
    assert len(executors) == 2 and [p.name for p in disk_dir.iterdir()] == ["weights.bin"]
    monkeypatch.undo()
    executors.clear()
    del llm
    assert not disk_dir.exists()


def test_cache_split_covers_every_slot() -> None:
    split = CacheSplit.of(10, 30, 30)
    assert (split.gpu, split.cpu, split.disk) == (3, 3, 4)
    assert split.ranges(0) == (0, 0, 0)
    assert split.ranges(5) == (3, 2, 0)
    assert split.ranges(10) == (3, 3, 4)
    assert CacheSplit.of(7, 100, 0).disk == 0 and CacheSplit.of(7, 0, 100).cpu == 7


@given(st.integers(1, 5000), st.integers(0, 100), st.integers(0, 100))
def test_cache_split_is_a_partition(max_len: int, gpu: int, cpu: int) -> None:
    cpu = min(cpu, 100 - gpu)
    split = CacheSplit.of(max_len, gpu, cpu)
    assert min(split.gpu, split.cpu, split.disk) >= 0
    assert split.gpu + split.cpu + split.disk == max_len
    assert abs(split.gpu - max_len * gpu / 100) <= 0.5 + 1e-9


def test_weight_tiers_follow_flexgen_midpoint_rule() -> None:
    # Four equal tensors: midpoints at 12.5, 37.5, 62.5, 87.5 percent of the layer.
    assert Placement(40, 30).weight_tiers([1, 1, 1, 1]) == [Tier.GPU, Tier.GPU, Tier.CPU, Tier.DISK]
    assert Placement(0, 100).weight_tiers([1, 1, 1, 1]) == [Tier.CPU] * 4
    assert Placement(50, 50).weight_tiers([8, 1, 1]) == [Tier.GPU, Tier.CPU, Tier.CPU]  # midpoint 40% -> GPU
    assert Placement(act_gpu=50, act_cpu=50).activation_tier is Tier.CPU
    assert tier_at(50, 50, 50) is Tier.CPU  # strictly below the running total, as FlexGen
    assert tier_at(50, 100, 0) is Tier.GPU and tier_at(50, 0, 0) is Tier.DISK


def test_disk_tensor_round_trip(tmp_path) -> None:
    tensor = DiskTensor(tmp_path / "t.bin", (3, 5, 2, 4), torch.float16)
    rows = torch.randn(2, 2, 4).half()
    tensor.write(1, 3, rows)
    out = torch.empty(2, 2, 4, dtype=torch.float16)
    tensor.read_into(1, 3, out)
    assert torch.equal(out, rows)
    with pytest.raises(ValueError):
        tensor.write(1, 4, rows)  # rows [4, 6) of 5
    tensor.close()
    assert not (tmp_path / "t.bin").exists()


def test_disk_queue_orders_writes_before_reads(tmp_path) -> None:
    tensor = DiskTensor(tmp_path / "q.bin", (1, 64, 16), torch.float32)
    queue = DiskQueue()
    for value in range(20):  # later writes of the same rows win
        rows = torch.full((64, 16), float(value))
        queue.submit("rows", lambda rows=rows: tensor.write(0, 0, rows))
    queue.wait("rows")
    out = torch.empty(64, 16)
    tensor.read_into(0, 0, out)
    assert torch.all(out == 19.0)
    queue.close()


def test_placement_flags_are_checked() -> None:
    assert str(Placement.parse("0 100 0 100 0 100".split())) == "0 100 0 100 0 100"
    with pytest.raises(KvprError, match="6 numbers"):
        Placement.parse(["0", "100"])
    with pytest.raises(KvprError, match="add up to more than 100"):
        Placement.parse("60 50 0 100 0 100".split())
    with pytest.raises(KvprError, match=r"must lie in \[0, 100\]"):
        Placement.parse("-1 50 0 100 0 100".split())
    with pytest.raises(KvprError, match="--offload-dir"):
        ThroughputConfig(Placement.parse("0 50 0 100 0 100".split()))
    with pytest.raises(KvprError, match="--gpu-batch-size"):
        ThroughputConfig(gpu_batch_size=0)


def test_block_too_small_for_score_is_one_line_error(tiny_checkpoint, tmp_path) -> None:
    llm = throughput_llm(tiny_checkpoint("opt"), "0 100 0 100 0 100", "off", 1, 2, tmp_path)
    with pytest.raises(KvprError, match="exceed the block of 2 GPU batches of 1"):
        llm.score([[1, 2, 3, 4]] * 3, prefix_len=2)


def test_plan_throughput_prints_kvpr_beside_flexgen(tmp_path, capsys) -> None:
    from test_throughput_policy import profile_for

    from kvpr.cli import main
    from kvpr.models.registry import builtin_config
    from kvpr.placement import plan_throughput

    path = profile_for(builtin_config("opt-6.7b")).save(tmp_path / "h100.json")
    argv = ["plan", "--mode", "throughput", "--model", "opt-6.7b", "--profile", str(path)]
    sizes = ["--gpu-memory-gib", "16", "--host-memory-gib", "200"]
    assert main(argv + sizes) == 0
    table = capsys.readouterr().out
    assert "kvpr" in table and "flexgen" in table
    config = EngineConfig(model="opt-6.7b", runtime=RuntimeConfig(profile_path=str(path), host_memory_gib=200))
    kvpr = plan_throughput(config, 256, 32, allow_recompute=True, gpu_memory_gib=16)
    flexgen = plan_throughput(config, 256, 32, allow_recompute=False, gpu_memory_gib=16)
    assert kvpr.tokens_per_s >= flexgen.tokens_per_s and flexgen.recompute_fraction == 0.0
    if not torch.cuda.is_available():
        assert main(argv) == 2
        assert "--gpu-memory-gib" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--percent", "0", "100", "0", "100", "0", "100", "--mode", "latency"], "needs --mode throughput"),
        (["--policy", "auto"], "add --mode throughput"),
        (["--percent", "0", "100", "0", "100", "0", "100", "--offload", "cpu"], "--percent places the cache"),
    ],
)
def test_throughput_flags_fail_in_one_line(argv: list[str], message: str, capsys) -> None:
    from kvpr.cli import main

    assert main(["bench", "--model", "opt-125m", "--dummy-weights", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
