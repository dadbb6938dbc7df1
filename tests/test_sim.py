"""kvpr sim: operator cycles worked by hand, K,V bytes against the runtime's own accounting, energy
totals, the two techniques moving time the expected way, the peak against the paper, the H200 model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvpr.cache.codec import make_codec
from kvpr.cache.rows import GatherStaging
from kvpr.cache.storage import CacheShape
from kvpr.compress.kvo_config import KVOConfig
from kvpr.config import ModelConfig
from kvpr.models.registry import builtin_config
from kvpr.runtime.kvo_cache import KVOCache
from kvpr.sim.dataflow import attention_op, fused_chain, matrix_op, os_gemm_cycles, pipelined
from kvpr.sim.hardware import PAPER, Accelerator, EnergyTable, MatrixCore, dense_baseline, kvo_llm
from kvpr.sim.report import machine_step
from kvpr.sim.workload import Gemm, Op, Unit, VRows, decode_step, kvo_reads

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(n_kv: int = 2, d: int = 64) -> ModelConfig:
    return ModelConfig.from_hf(
        {"model_type": "llama", "hidden_size": 2 * n_kv * d, "intermediate_size": 256, "num_hidden_layers": 4,
         "num_attention_heads": 2 * n_kv, "num_key_value_heads": n_kv, "vocab_size": 100}
    )  # fmt: skip


# -- cycles of single operators ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("m", "k", "n", "scalesim_cycles"),
    [(16, 128, 64, 631), (32, 256, 48, 1715), (16, 64, 16, 93)],  # SCALE-Sim 3.0.0, os, 16 x 16, COMPUTE_REPORT
)
def test_output_stationary_cycles_match_scalesim(m: int, k: int, n: int, scalesim_cycles: int) -> None:
    assert os_gemm_cycles(Gemm(m, k, n), 16, 16) == scalesim_cycles


def test_output_stationary_cycles_by_hand() -> None:
    # [5, 10] x [10, 9] on a 4 x 4 array: ceil(5/4) * ceil(9/4) = 6 tiles of 10 + 4 + 4 - 2 = 16 cycles
    assert os_gemm_cycles(Gemm(5, 10, 9), 4, 4) == 6 * 16 - 1
    # int4 packs two MACs a PE: K = 10 takes 5 cycles
    assert os_gemm_cycles(Gemm(5, 10, 9), 4, 4, macs_per_pe=2.0) == 6 * 11 - 1
    assert pipelined(3.0, 10.0, 4.0, 5) == 3 + 4 * 10 + 10
    assert pipelined(3.0, 2.0, 4.0, 5) == 3 + 4 * 4 + 2


def test_matrix_op_cycles_by_hand() -> None:
    # one core of 4 x 4, DRAM 8 bytes a cycle at full efficiency: [4, 16] x [16, 8] int8, 128 weight bytes
    machine = Accelerator("t", clock_hz=1.0, num_matrix_cores=1, matrix=MatrixCore(4, 4, 1 << 20))
    machine = machine.with_(dram=machine.dram.__class__(bytes_per_s=8.0, eff_max=1.0, n_half=0.0))
    op = Op("lin", Unit.MATRIX, macs=4 * 16 * 8, gemm=Gemm(4, 16, 8), weight_bytes=128)
    cycles = matrix_op(op, machine)
    # 2 column tiles, each 16 + 4 + 4 - 2 = 22 cycles of MACs and 64 bytes = 8 cycles of loads
    assert cycles.compute == 44
    assert cycles.memory == 16
    assert cycles.cycles == 8 + 22 + 22
    assert cycles.dram_bytes == 128


def test_attention_ops_and_fused_chain_by_hand() -> None:
    machine = kvo_llm().with_(dram=kvo_llm().dram.__class__(bytes_per_s=800e6 * 100, eff_max=1.0, n_half=0.0))
    score = Op("score", Unit.ATTENTION, macs=10240, kv_bytes=1000.0, kv_run_bytes=100.0, inter_bytes=50.0)
    softmax = Op("softmax", Unit.ATTENTION, elements=320, inter_bytes=50.0)
    a, s = attention_op(score, machine), attention_op(softmax, machine)
    assert (a.compute, a.memory) == (10.0, 10.0)  # 10240 MACs on 1024 lanes; 1000 bytes at 100 a cycle
    assert s.compute == 10.0  # 320 exponentials at 32 a cycle
    unfused = machine.with_(fusion=False)
    assert attention_op(score, unfused).memory == 10.0 + 2 * 50 / 100  # the scores written and read back
    # fused over 2 heads: the busiest stage (lanes, dram, softmax: 10 each) plus the others' share of one head
    assert fused_chain([a, s], heads=2) == 10.0 + 20.0 / 2


# -- K,V bytes against the codecs and the runtime -------------------------------------------------


@pytest.mark.parametrize("top_chunks", [4, 64])
def test_kvo_bytes_equal_the_runtime_accounting(top_chunks: int) -> None:
    b, n, d, s = 2, 2, 64, 300
    model, config = tiny_model(n, d), KVOConfig(top_chunks=top_chunks)
    shape = CacheShape(1, s + 8, b, n, d, 2 * n * d, torch.float32)
    cache = KVOCache(config, shape, torch.device("cpu"), on_host=True, staging=GatherStaging(False))
    torch.manual_seed(0)
    k, v = torch.randn(s, b, n, d), torch.randn(s, b, n, d)
    cache.prefill(k, v, torch.ones(s, b, dtype=torch.bool), torch.rand(s, b, n))
    with torch.inference_mode():
        cache.decode(torch.randn(b, 2 * n, d), torch.randn(b, n, d), torch.randn(b, n, d))
    assert cache._read_v_rows is not None
    distinct = torch.unique(cache._read_v_rows).numel() / (b * n)
    reads = kvo_reads(model, b, s, config, VRows.DISTINCT, distinct_groups=distinct)
    assert reads.read_bytes == cache.read_bytes
    assert reads.link_bytes == cache.link_bytes  # staged gather: K rows and each distinct V row once
    per_chunk = kvo_reads(model, b, s, config, VRows.PER_CHUNK)
    assert per_chunk.link_bytes == b * n * reads.selected * (cache.k_layout.row_bytes + cache.v_layout.row_bytes)
    if top_chunks >= reads.num_chunks:  # every chunk read: the expectation is exact
        assert kvo_reads(model, b, s, config, VRows.DISTINCT).read_bytes == cache.read_bytes


def test_kvo_bytes_per_window_equal_the_codec() -> None:
    """A window's anchors, K rows and V rows, plus the orders the runtime keeps aside, are the codec's
    ``window_nbytes`` (rows carry no padding at d = 128)."""
    config, b, n, d = KVOConfig(), 3, 4, 128
    model = tiny_model(n, d)
    # a context whose every chunk is read and scored by none: 2 windows finalised, recent window of 64 + 1
    reads = kvo_reads(model, b, 3 * config.window - 1, KVOConfig(top_chunks=1000), VRows.DISTINCT)
    windows = reads.num_chunks * config.chunk // config.window
    order = b * n * reads.num_chunks * math.ceil(config.chunk * config.order_bits / 8)
    packed = reads.anchor_bytes + reads.k_row_bytes + reads.v_row_bytes + order
    assert packed == windows * config.window_nbytes(b, n, d)
    assert make_codec("kvo").bytes_per_token(b, n, d) == config.window_nbytes(b, n, d) / config.window


@pytest.mark.parametrize("codec", ["fp16", "int8", "int4"])
def test_dense_kv_bytes_equal_the_codec(codec: str) -> None:
    b, s, model = 2, 37, tiny_model()
    step = decode_step(model, "tiny", b, s, codec)
    kv = torch.randn(s + 1, b, model.num_kv_heads, model.head_dim)
    encoded = make_codec(codec).encode(kv, kv)
    assert step.kv_read_bytes == model.num_layers * encoded.nbytes


def test_kvo_step_keeps_the_first_layers_dense() -> None:
    model = builtin_config("llama-2-7b")
    step = decode_step(model, "llama-2-7b", 16, 4096, "kvo")
    assert [(g.kind, g.count) for g in step.layers] == [("dense", 2), ("kvo", 30)]
    fp16 = decode_step(model, "llama-2-7b", 16, 4096, "fp16")
    per_layer = step.notes["kvo_layer_read_bytes"] / step.notes["fp16_layer_read_bytes"]
    assert 0.05 < per_layer < 0.15  # the paper: about 94% fewer bytes read per step at 3.5K
    assert step.kv_read_bytes < 0.2 * fp16.kv_read_bytes


# -- energy, the two techniques, the peak ----------------------------------------------------------


def test_energy_totals() -> None:
    model = builtin_config("llama-2-7b")
    result = machine_step(model, "llama-2-7b", 16, 4096, kvo_llm())
    e, energy = kvo_llm().energy, result.energy_j()
    assert energy["mac"] == pytest.approx(sum(op.macs * e.mac_pj(op.precision) for op in result.ops) * 1e-12)
    assert energy["dram"] == pytest.approx(result.dram_bytes * 3.9 * 8 * 1e-12)
    assert energy["static"] == pytest.approx(0.1 * result.seconds / 2)  # two batches share the time
    assert result.macs == result.step.macs
    assert EnergyTable().mac_int8_pj == pytest.approx(0.3 * 28 / 45)


def test_fusion_and_interleaving_move_time_the_expected_way() -> None:
    model = builtin_config("llama-2-7b")
    run = {
        (f, i): machine_step(model, "llama-2-7b", 16, 8192, kvo_llm().with_(fusion=f, interleave=i))
        for f in (True, False)
        for i in (True, False)
    }
    # fusion keeps the chain's intermediates out of DRAM: fewer bytes, a shorter attention phase
    assert run[True, False].dram_bytes < run[False, False].dram_bytes
    assert run[True, False].phases[-1].attention < run[False, False].phases[-1].attention
    assert run[True, False].seconds < run[False, False].seconds
    # interleaving hides memory-bound attention under compute-bound projections: more tokens/s
    assert run[True, True].tokens_per_s > run[True, False].tokens_per_s
    assert run[False, True].tokens_per_s > run[False, False].tokens_per_s
    dense = machine_step(model, "llama-2-7b", 16, 8192, dense_baseline("fp16"))
    assert run[True, True].tokens_per_s > dense.tokens_per_s


def test_peak_reproduces_the_paper_within_5_percent() -> None:
    machine = kvo_llm()
    assert machine.peak_gops == 2 * 2048 * 800e6 / 1e9
    assert abs(machine.peak_gops / PAPER["peak_gops"] - 1) < 0.05
    assert abs(machine.peak_gops / machine.peak_power_w / PAPER["gops_per_w"] - 1) < 0.05


# -- the H200 model and the command ----------------------------------------------------------------


def test_h200_validation_of_the_link_bound_rows() -> None:
    from kvpr.sim.validation import validation_rows

    rows = {row["workload"]: row for row in validation_rows(ROOT)}
    for name in ("opt-6.7b 32 x 256 + 32, kvpr-off", "opt-6.7b 16 x 2016 + 16, kvpr-auto",
                 "llama-3-8b 16 x 2048 + 16, kvpr-off"):  # fmt: skip
        assert abs(rows[name]["error"]) < 0.05, rows[name]
        assert rows[name]["measured_source"].startswith("benchmarks/results/")


def _flat_gpu(host_layer: dict[str, float], host_chunk: dict[str, float]) -> object:
    """A GpuMachine with one rate everywhere: H2D 50 GB/s, recompute 500 TFLOP/s, HBM 4 TB/s."""
    from kvpr.scheduler.cost_model import RateCurve
    from kvpr.scheduler.profile import HardwareProfile
    from kvpr.sim.gpu import GpuMachine

    flat = lambda rate: RateCurve.from_points([(1.0, rate), (1e12, rate)])  # noqa: E731
    profile = HardwareProfile(
        device_name="test", torch_version="0", h2d=flat(50e9), d2h=flat(50e9), gemm=flat(500e12), gemm_hidden=128,
        gemm_kv_width=128, host_layer_s=host_layer, host_chunk_s=host_chunk,
    )  # fmt: skip
    return GpuMachine(profile, 4e12, ("test",))


def test_op_counter_counts_aten_ops_and_a_triton_launch_as_one() -> None:
    import torch

    from kvpr.runtime.split_attention import Partials, attend_piece
    from kvpr.sim.host_ops import count_ops

    a = torch.ones(2, 3)
    assert count_ops(lambda: (a + a).relu()) == 2  # add, relu
    assert count_ops(lambda: a.view(3, 2).t()[0]) == 0  # views launch nothing
    q, k = torch.randn(2, 4, 8), torch.randn(5, 2, 2, 8)  # [b, n_q, d], [t, b, n_kv, d]
    # attend_piece runs ~10 float32 ops and copies its partial on the CPU; on CUDA it is one Triton
    # launch writing rows that Partials.reserve hands it as views: counted as 1
    partials = Partials()
    assert count_ops(lambda: attend_piece(q, k, k, None, partials)) == 1
    assert count_ops(lambda: attend_piece(q, k, k, None, partials)) == 1


def test_kv_chunk_stream_and_launch_ops_by_hand() -> None:
    """A K,V chunk of the tiered executor (runtime/latency.py): ``take`` (compute_waits), the piece
    (one Triton launch), ``release`` (record_on_compute) and the pump's load of the next chunk
    (copy_waits for the slot to be free, on_copy, record_on_copy; the layer's flushed mark was waited
    for once, by the first chunk): 6 calls that are no-ops on the CPU, each counted as one; and the
    K and V parts' copies (the slices and selects are views)."""
    from collections import Counter
    from unittest import mock

    from kvpr.sim import host_ops

    calls: list[str] = []
    one_op = host_ops.OpCounter.one_op

    def recording(self: host_ops.OpCounter, fn: object, ops: int = 1) -> object:
        counted = one_op(self, fn, ops)

        def call(*args: object, **kwargs: object) -> object:
            if not self.suspended and ops:
                calls.append(fn.__name__)
            return counted(*args, **kwargs)

        return call

    opt = builtin_config("opt-6.7b")
    with mock.patch.object(host_ops.OpCounter, "one_op", recording):
        two = host_ops._tiered_decode_ops(opt, 1, True)
        two_calls = Counter(calls)
        calls.clear()
        three = host_ops._tiered_decode_ops(opt, 1, True, prompt=48)
    more = Counter(calls) - two_calls
    assert more == Counter(
        {"copy_waits": 1, "on_copy": 1, "record_on_copy": 1, "compute_waits": 1, "record_on_compute": 1,
         "_attend_torch": 1}
    )  # fmt: skip
    assert three - two == host_ops.tiered_ops(opt).kv_chunk == 6 + 2  # and the K and V parts' two copies


def test_tiered_ops_by_family_and_path() -> None:
    from kvpr.sim.host_ops import tiered_ops

    opt, llama = tiered_ops(builtin_config("opt-6.7b")), tiered_ops(builtin_config("llama-3-8b"))
    assert llama.gpu_layer > opt.gpu_layer  # RMSNorm, rotary and the gated MLP issue more ops
    assert opt.host_layer > opt.gpu_layer  # pieces and their merge instead of one attention
    assert opt.recompute_step == 0 and llama.recompute_step > 0  # only llama makes rotary tables of old tokens
    assert opt.step(32, 0, 0) == opt.gpu_step + 32 * opt.gpu_layer
    assert opt.step(2, 3, 1) == opt.host_step + 2 * (opt.host_layer + 3 * opt.x_chunk + opt.kv_chunk)


def test_host_cost_and_overlap() -> None:
    from kvpr.sim.host import HostCost, Probe, overlapped_s

    cost = HostCost.from_probes([Probe(1e-3, 100, "a"), Probe(3e-3, 100, "b"), Probe(1.2e-3, 100, "c")])
    assert cost.op_s == pytest.approx(12e-6)  # the median of 10, 30 and 12 us an op
    assert cost.seconds(50) == pytest.approx(0.6e-3)
    assert overlapped_s(2.0, 3.0) == 3.0 and overlapped_s(3.0, 2.0) == 3.0
    with pytest.raises(ValueError):
        HostCost.from_probes([Probe(1e-3, 0, "empty")])


def test_host_term_moves_a_host_bound_prediction_up_and_leaves_a_link_bound_one() -> None:
    from kvpr.sim.gpu import kvpr_tiered_ms
    from kvpr.sim.host import HostCost, Probe
    from kvpr.sim.host_ops import TieredOps

    model = tiny_model(n_kv=2, d=64)
    gpu = _flat_gpu({"none": 0.0}, {"none": 0.0})
    ops = TieredOps(gpu_layer=30, host_layer=40, x_chunk=25, kv_chunk=20, gpu_step=50, host_step=40, recompute_step=0)
    free, slow = HostCost.from_probes([Probe(0.0, 1, "free")]), HostCost.from_probes([Probe(20e-6, 1, "slow")])
    resident = [(0, 0, 1)] * 4  # every token in the GPU tier: tiny device work, host-bound
    assert kvpr_tiered_ms(gpu, model, 1, 64, resident, 64, 64, ops, slow) > kvpr_tiered_ms(
        gpu, model, 1, 64, resident, 64, 64, ops, free
    )
    step_ops = ops.step(model.num_layers, 0, 0)
    assert kvpr_tiered_ms(gpu, model, 1, 64, resident, 64, 64, ops, slow) == pytest.approx(1e3 * step_ops * 20e-6)
    offloaded = [(60_000, 0, 1)] * 4  # 60k host tokens at batch 64 in one K,V chunk: the link dominates
    link = kvpr_tiered_ms(gpu, model, 64, 60_064, offloaded, 60_000, 64, ops, free)
    assert kvpr_tiered_ms(gpu, model, 64, 60_064, offloaded, 60_000, 64, ops, slow) == pytest.approx(link)


def test_each_session_gets_its_machines_per_op_cost() -> None:
    from kvpr.sim.validation import (
        H200_SOURCES,
        PAPER_6A80B95,
        SHARE075_6A80B95,
        SWEEP_72448D7,
        TIERED_A266AD4,
        HostModel,
        calibration_probes,
    )  # fmt: skip

    runs = {source.results: source.tiered for source in H200_SOURCES if source.tiered is not None}
    probes = calibration_probes(ROOT)  # each counted on the executor of its own session
    a266ad4 = runs[TIERED_A266AD4].ops
    gpu_tier = sorted(p.ops for p in probes if p.session == TIERED_A266AD4)  # the a266ad4 probes: one attention
    assert gpu_tier == sorted([a266ad4["opt"].gpu_layer, a266ad4["llama"].gpu_layer])
    opt = runs[SWEEP_72448D7].ops["opt"]
    format5 = {p.source.split(": ")[1]: p.ops for p in probes if "-format5.json" in p.source}
    assert format5 == {"host_layer_s": opt.host_layer + opt.kv_chunk, "host_chunk_s": opt.x_chunk}
    leaner = runs[SHARE075_6A80B95].ops["opt"]  # one stream wait fewer a chunk than 72448d7
    own = {p.source.split(": ")[1]: p.ops for p in probes if p.session == SHARE075_6A80B95}
    assert own == {"host_layer_s": leaner.host_layer + leaner.kv_chunk, "host_chunk_s": leaner.x_chunk}
    assert own["host_layer_s"] == format5["host_layer_s"] - 2 and own["host_chunk_s"] == format5["host_chunk_s"] - 1
    host = HostModel.count(ROOT)
    assert {p.session for p in host.cost(TIERED_A266AD4).probes} == {TIERED_A266AD4}
    assert {p.session for p in host.cost(SWEEP_72448D7).probes} == {SWEEP_72448D7}
    assert host.cost(PAPER_6A80B95) is host.cost(SHARE075_6A80B95)  # one device call: one profile
    assert host.cost("latency-NVIDIA_H200-20261203.json") is host.pooled  # its session profiled no countable path


def test_tiered_layer_by_hand() -> None:
    from kvpr.sim.gpu import _layer_compute_s, tiered_chunks, tiered_layer
    from kvpr.sim.workload import decode_step

    model = tiny_model(n_kv=2, d=64)  # h = 256, kv_size = 128
    gpu = _flat_gpu({"none": 0.2e-3}, {"none": 0.0})
    b, gpu_len, host_len, recompute_len, c, slot = 4, 100, 300, 200, 2, 64
    t = tiered_layer(gpu, model, b, gpu_len, host_len, recompute_len, c, slot, slot)
    x_bytes, kv_bytes = 200 * 4 * 256 * 2, 100 * 2 * 4 * 128 * 2  # X of [0, l); K,V of [l, h)
    assert t.copy_s == pytest.approx((x_bytes + kv_bytes) / 50e9)
    # X in max(2, ceil(200 / 64)) = 4 chunks, K,V in ceil(100 / 64) = 2; with X slots of 128: 2 X chunks
    assert tiered_chunks(host_len, recompute_len, c, slot, slot) == (4, 2)
    assert tiered_chunks(host_len, recompute_len, 1, slot, 128) == (2, 2)
    flops = 2.0 * b * recompute_len * 256 * 2 * 128
    step = decode_step(model, model.model_type, b, gpu_len + host_len, "fp16", weight_bits=16)
    assert t.compute_s == pytest.approx(x_bytes / 50e9 / 4 + flops / 500e12 + _layer_compute_s(gpu, step))
    resident = tiered_layer(gpu, model, b, 400, 0, 0, 1, slot, slot)
    assert resident.copy_s == 0.0  # no host tier: one attention


def test_h200_validation_notes_every_miss_and_covers_the_tiered_rows() -> None:
    from kvpr.sim.validation import validation_rows

    rows = validation_rows(ROOT)
    assert len(rows) == 43 and all(row["within_tolerance"] or row.get("note") for row in rows)
    assert sum(row["within_tolerance"] for row in rows) >= 32
    tiered = [row for row in rows if "tiered-NVIDIA_H200" in row["measured_source"]]
    assert len(tiered) == 13
    off = {row["workload"]: row for row in tiered}["opt-6.7b 16 x 2016 + 16, kvpr-off-tiered GPU 0.50"]
    assert abs(off["error"]) < 0.08
    sweep = [row for row in rows if row["measured_source"].endswith("-72448d7.json")]
    assert len(sweep) == 8 and all(row["model"].startswith("kvpr tiered at 72448d7") for row in sweep)
    offloaded = [row for row in sweep if "GPU 1.00" not in row["workload"]]
    assert len(offloaded) == 6 and all(row["within_tolerance"] for row in offloaded)
    leaner = {row["workload"]: row for row in rows if row["measured_source"].endswith("-6a80b95.json")}
    assert len(leaner) == 5 and all(
        row["model"].startswith(("kvpr tiered at 6a80b95", "kvpr offloaded")) for row in leaner.values()
    )
    assert abs(leaner["opt-6.7b 32 x 256 + 32, kvpr-auto"]["error"]) < 0.05  # the paper's workload, all on the host
    newest = {row["workload"]: row for row in rows if row["measured_source"].endswith("-5c6952d.json")}
    assert newest["opt-6.7b 16 x 2016 + 16, kvpr-tiered GPU 0.75"]["model"].startswith("kvpr tiered at 5c6952d")
    assert newest["opt-6.7b 16 x 2016 + 16, kvpr-tiered GPU 0.75"]["within_tolerance"]


def test_kvpr_sim_command_writes_json_and_png(tmp_path: Path) -> None:
    from kvpr.cli import main

    out = tmp_path / "sim"
    assert main(["sim", "--context", "2048", "--sweep-context", "1024", "--sweep-batch", "8", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["machines"][0]["machine"] == "kvo-llm"
    assert report["headline"]["vs"]["dense-fp16"]["throughput"] > 1.0
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_the_newest_pinned_executor_is_todays() -> None:
    """The op counts pinned for the last measured tiered run are what this checkout's executor
    issues, until the executor changes: then re-measure, and pin the new run's counts beside it."""
    from kvpr.sim.host_ops import tiered_ops
    from kvpr.sim.validation import H200_SOURCES

    newest = [source.tiered for source in H200_SOURCES if source.tiered is not None][-1]
    for family, name in (("opt", "opt-6.7b"), ("llama", "llama-3-8b")):
        assert newest.ops[family] == tiered_ops(builtin_config(name)), (newest.commit, family)
