"""Codecs in throughput mode: 4-bit weights (``--compress-weight``) and the int8/int4 K,V and X codecs
in the block schedule, checked against latency mode with the same arithmetic (CPU fp32, exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import cpu_llm
from kvpr.api import LLM
from kvpr.compress.quant import dequantize_groups, quantize_groups
from kvpr.compress.weight_quant import WeightLayout, round_trip
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig, SamplingParams
from kvpr.throughput_config import Placement, ThroughputConfig

PROMPTS = [[5, 17, 33, 2, 90, 11], [7, 7, 61], [100, 3, 44, 21, 9, 8, 71, 12, 4], [1, 2, 3], [9, 9]]
PARAMS = SamplingParams(max_new_tokens=9, stop_on_eos=False)


def throughput_llm(
    directory: Path | str,
    percent: str,
    offload_dir: Path,
    recompute: object = "off",
    kv_codec: str = "none",
    x_codec: str = "none",
    compress_weight: bool = False,
    gbs: int = 2,
    ngb: int = 3,
) -> LLM:
    placement = Placement.parse(percent.split())
    return LLM(
        EngineConfig(
            model=str(directory),
            cache=CacheConfig(offload=Offload.CPU, recompute=recompute, kv_codec=kv_codec, x_codec=x_codec),  # type: ignore[arg-type]
            runtime=RuntimeConfig(device="cpu", dtype="float32", num_chunks=3),
            throughput=ThroughputConfig(
                placement, gbs, ngb, offload_dir=str(offload_dir), compress_weight=compress_weight
            ),
        )
    )


# -- 4-bit weights ---------------------------------------------------------------------------------


def test_weight_layout_round_trip_is_the_quantiser_round_trip() -> None:
    torch.manual_seed(0)
    weight = torch.randn(24, 96)  # n_in 96: groups of gcd(64, 96) = 32
    layout = WeightLayout.of((24, 96), torch.float32)
    assert layout.compressed and layout.group == 32
    codes, scale, zero = quantize_groups(weight, 4, 32)
    expected = dequantize_groups(codes, scale, zero, 4, 96, torch.float32)
    assert torch.equal(layout.decode(layout.encode(weight)), expected)
    assert (round_trip(weight) - weight).abs().max() <= (scale.float().max() / 2) * (1 + 1e-3)
    bias = torch.randn(24)
    assert torch.equal(round_trip(bias), bias)  # 1-D tensors are kept as they are
    # 4 bits a value and an fp16 scale and zero per group of 32, padded to 16 bytes a segment
    assert layout.nbytes == 24 * 48 + 2 * 24 * 3 * 2


def _round_tripped(directory: Path) -> LLM:
    """The latency-mode engine with every decoder layer's weight matrices replaced by their round trip."""
    llm = cpu_llm(directory)
    with torch.no_grad():
        for layer in llm.model.decoder_layers:
            for param in layer.parameters():
                param.copy_(round_trip(param))
    return llm


@pytest.mark.parametrize("family", ["opt", "llama-gqa"])
@pytest.mark.parametrize("percent", ["0 100 0 100 0 100", "30 30 30 30 30 30", "0 0 0 0 0 0"])
def test_compressed_weights_match_round_tripped_model(tiny_checkpoint, tmp_path, family, percent) -> None:
    directory = tiny_checkpoint(family)
    llm = throughput_llm(directory, percent, tmp_path, compress_weight=True)
    weights = llm.layer_weights
    assert weights is not None and weights.compress
    if percent == "0 100 0 100 0 100":  # every tensor streamed: the model equals the round-tripped one
        reference = [c.token_ids for c in _round_tripped(directory).generate(PROMPTS, PARAMS)]
        assert [c.token_ids for c in llm.generate(PROMPTS, PARAMS)] == reference
        plain = [c.token_ids for c in cpu_llm(directory).generate(PROMPTS, PARAMS)]
        assert reference != plain or family == "llama-gqa"  # the round trip changes the arithmetic
    else:  # GPU-resident tensors stay exact: compare layer by layer against the round trip of streamed ones
        dense = cpu_llm(directory)
        llm.make_executor(1, 4)  # starts the weights: their buffers exist from here
        for index, layer in enumerate(llm.model.decoder_layers):
            weights.activate(index)
            for (name, param), (_, original) in zip(
                layer.named_parameters(), dense.model.decoder_layers[index].named_parameters()
            ):
                expected = original if weights.tier[name].value == "gpu" else round_trip(original)
                assert torch.equal(param.data, expected.data), (index, name)
            weights.release(index)
        llm.generate(PROMPTS, PARAMS)  # and it runs


def test_compressed_weights_store_fewer_bytes(tiny_checkpoint, tmp_path) -> None:
    from kvpr.throughput_config import Tier

    directory = tiny_checkpoint("opt")
    plain = throughput_llm(directory, "0 100 0 100 0 100", tmp_path).layer_weights
    packed = throughput_llm(directory, "0 100 0 100 0 100", tmp_path, compress_weight=True).layer_weights
    assert plain is not None and packed is not None
    ratio = packed.layer_bytes(Tier.CPU) / plain.layer_bytes(Tier.CPU)
    assert 0.125 < ratio < 0.3  # fp32 model: 4 bits + 4 bytes per 64 (or 32) values, against 32 bits
    assert packed.host[0].numel() == packed.layer_bytes(Tier.CPU)


# -- K,V and X codecs in the block schedule --------------------------------------------------------


def latency_llm(directory: Path | str, kv_codec: str, x_codec: str = "none", recompute: object = "off") -> LLM:
    """Latency mode with every token past its step on the host tier under the codecs (a tail of one
    token, nothing resident): the arithmetic of throughput mode's CPU tier."""
    return LLM(
        EngineConfig(
            model=str(directory),
            cache=CacheConfig(
                offload=Offload.CPU,
                recompute=recompute,
                kv_codec=kv_codec,
                x_codec=x_codec,
                gpu_resident=0,  # type: ignore[arg-type]
            ),
            runtime=RuntimeConfig(device="cpu", dtype="float32", num_chunks=3, flush_block=1),
        )
    )


def _tokens(llm: LLM) -> list[list[int]]:
    return [c.token_ids for c in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("family", ["opt", "llama-gqa"])
@pytest.mark.parametrize("kv_codec", ["int4", "int8"])
@pytest.mark.parametrize("percent", ["0 100 0 100 0 100", "0 0 0 0 0 0", "0 100 0 40 0 100"])
def test_kv_codec_matches_latency_mode(tiny_checkpoint, tmp_path, family, kv_codec, percent) -> None:
    """Every cached token encoded once, decoded on load: the tokens of latency mode's host tier."""
    directory = tiny_checkpoint(family)
    reference = _tokens(latency_llm(directory, kv_codec))
    assert _tokens(throughput_llm(directory, percent, tmp_path, kv_codec=kv_codec)) == reference
    if kv_codec == "int4":  # int4 changes something, so the comparison is not vacuous
        assert reference != _tokens(cpu_llm(directory)) or family == "llama-gqa"


@pytest.mark.parametrize("family", ["opt", "llama-gqa"])
@pytest.mark.parametrize(("kv_codec", "x_codec"), [("int4", "int8"), ("none", "int4"), ("int8", "none")])
def test_x_codec_recompute_matches_latency_mode(tiny_checkpoint, tmp_path, family, kv_codec, x_codec) -> None:
    """Half the CPU tier recomputed from X stored under the X codec, the rest copied under the K,V codec."""
    directory = tiny_checkpoint(family)
    reference = latency_llm(directory, kv_codec, x_codec, recompute=0.5)
    expected = _tokens(reference)
    llm = throughput_llm(directory, "0 100 0 100 0 100", tmp_path, 0.5, kv_codec, x_codec)
    assert _tokens(llm) == expected
    assert (
        llm.last_stats.recompute_lens == reference.last_stats.recompute_lens and max(llm.last_stats.recompute_lens) > 0
    )


# Largest change of a teacher-forced log-probability of the tiny random OPT against the uncompressed
# run, about twice what was measured (int8 K,V 0.013, int4 0.094, 4-bit weights 0.41, both 0.48):
# int8 keeps 255 levels per group, int4 15; random weights have no outliers to protect.
SCORE_BOUNDS = {("int8", False): 0.03, ("int4", False): 0.2, ("none", True): 0.8, ("int4", True): 1.0}


@pytest.mark.parametrize(("kv_codec", "compress_weight"), list(SCORE_BOUNDS))
def test_scores_within_bound_of_uncompressed(tiny_checkpoint, tmp_path, kv_codec, compress_weight) -> None:
    directory = tiny_checkpoint("opt")
    sequences = [[5, 17, 33, 2, 90, 11, 4, 8, 61, 3, 9, 12], [7, 7, 61, 3, 9, 12, 40, 2, 5, 17, 33, 2]]
    reference = cpu_llm(directory).score(sequences, prefix_len=3)
    llm = throughput_llm(
        directory, "0 100 0 100 0 100", tmp_path, "off", kv_codec, compress_weight=compress_weight, gbs=1, ngb=2
    )
    error = (llm.score(sequences, prefix_len=3) - reference).abs().max().item()
    assert 0 < error <= SCORE_BOUNDS[kv_codec, compress_weight]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--percent", "0", "100", "0", "100", "0", "100", "--kv-codec", "kvo"], "is a cache method"),
        (["--percent", "0", "100", "0", "100", "0", "100", "--kv-codec", "kivi4"], "is a cache method"),
        (["--percent", "0", "100", "0", "100", "0", "100", "--kv-codec", "fp16"], "use none, int8 or int4"),
        (["--percent", "100", "0", "100", "0", "100", "0", "--kv-codec", "int4"], "keeps all of it on the GPU"),
        (["--compress-weight"], "needs --mode throughput"),
    ],
)
def test_bad_codec_combinations_fail_in_one_line(flags: list[str], message: str, capsys) -> None:
    from conftest import cli_error_line

    argv = ["bench", "--model", "opt-125m", "--dummy-weights", "--device", "cpu", *flags]
    assert message in cli_error_line(capsys, argv)


# -- the policy counts encoded bytes ---------------------------------------------------------------


def test_block_memory_counts_encoded_bytes() -> None:
    from kvpr.models.registry import builtin_config
    from kvpr.scheduler.throughput_bytes import CacheCodecs
    from kvpr.scheduler.throughput_memory import block_memory
    from kvpr.throughput_config import Tier

    model = builtin_config("opt-30b")  # h 7168, 56 heads of 128, 48 layers
    plain_config = ThroughputConfig(Placement.parse("0 100 0 100 0 100".split()), 32, 2)
    packed_config = ThroughputConfig(plain_config.placement, 32, 2, compress_weight=True)
    plain = block_memory(model, plain_config, 64, 288, False, 2)
    packed = block_memory(model, packed_config, 64, 288, False, 2, CacheCodecs("int4"))
    # int4 K,V: 4 bits a value and an fp16 scale and zero per 32 channels = 0.3125 of fp16
    assert packed[Tier.CPU]["kv cache"] == pytest.approx(plain[Tier.CPU]["kv cache"] * 0.3125)
    # 4-bit weights in groups of 64: 0.28125 of fp16 for the matrices, biases and norms as they are
    ratio = packed[Tier.CPU]["layer weights"] / plain[Tier.CPU]["layer weights"]
    assert 0.28125 < ratio < 0.2815
    # two encoded layer buffers and one decoded one, against two decoded
    assert packed[Tier.GPU]["weight buffers"] == pytest.approx(plain[Tier.GPU]["weight buffers"] * (ratio + 0.5))


def test_compressed_run_admits_a_larger_block() -> None:
    """Under the same host memory, the search finds a larger block once weights and cache are 4-bit."""
    from test_throughput_policy import profile_for

    from kvpr.models.registry import builtin_config
    from kvpr.scheduler.throughput_bytes import CacheCodecs, ThroughputWorkload
    from kvpr.scheduler.throughput_cost import MachineLimits
    from kvpr.scheduler.throughput_policy import search_policy

    model = builtin_config("opt-30b")
    limits = MachineLimits(30 * 2**30, 80 * 2**30, 0.0, 1e9, 1e9)  # fp16 weights alone take 56 GiB
    workload = ThroughputWorkload(256, 32)
    grid = {"gpu_batch_sizes": (8, 16, 32, 64), "num_gpu_batches": (1, 2, 4, 8, 16)}
    profile = profile_for(model)
    plain = search_policy(model, profile, limits, workload, allow_recompute=False, **grid)
    packed = search_policy(
        model,
        profile,
        limits,
        workload,
        allow_recompute=False,
        codecs=CacheCodecs("int4"),
        compress_weight=True,
        **grid,
    )
    assert packed.config.compress_weight and not plain.config.compress_weight
    assert packed.config.block_size > plain.config.block_size
    assert packed.memory_bytes["cpu"] <= limits.cpu_bytes and packed.memory_bytes["gpu"] <= limits.gpu_bytes
    assert packed.tokens_per_s > plain.tokens_per_s


def test_estimate_adds_the_measured_kv_decode() -> None:
    import dataclasses

    from test_throughput_policy import profile_for

    from kvpr.models.registry import builtin_config
    from kvpr.scheduler.cost_model import RateCurve
    from kvpr.scheduler.throughput_bytes import CacheCodecs, ThroughputWorkload
    from kvpr.scheduler.throughput_cost import MachineLimits, estimate

    model = builtin_config("opt-6.7b")
    limits = MachineLimits(40 * 2**30, 200 * 2**30, 0.0, 1e9, 1e9)
    config = ThroughputConfig(Placement.parse("100 0 0 100 100 0".split()), 16, 1)
    workload = ThroughputWorkload(512, 32)
    profile = profile_for(model)
    measured = dataclasses.replace(profile, kv_decode={"int4": RateCurve.from_points([(2**20, 1e11)])})
    unmeasured = estimate(model, profile, limits, workload, config, 0.0, codecs=CacheCodecs("int4"))
    timed = estimate(model, measured, limits, workload, config, 0.0, codecs=CacheCodecs("int4"))
    # the whole mean context is copied from the CPU tier: its stored bytes at 100 GB/s, per layer and step
    stored = 16 * workload.mean_context * 0.3125 * 2 * model.kv_size * 2
    added = timed.layer_terms_s["decode"]["compute"] - unmeasured.layer_terms_s["decode"]["compute"]
    assert added == pytest.approx(stored / 1e11)
    plain = estimate(model, profile, limits, workload, config, 0.0)
    assert unmeasured.layer_terms_s["decode"]["h2d"] == pytest.approx(
        0.3125 * plain.layer_terms_s["decode"]["h2d"], rel=0.02
    )
