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
from kvpr.config import CacheConfig, EngineConfig, Offload, Placement, RuntimeConfig, SamplingParams, ThroughputConfig

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
    from kvpr.config import Tier

    directory = tiny_checkpoint("opt")
    plain = throughput_llm(directory, "0 100 0 100 0 100", tmp_path).layer_weights
    packed = throughput_llm(directory, "0 100 0 100 0 100", tmp_path, compress_weight=True).layer_weights
    assert plain is not None and packed is not None
    ratio = packed.layer_bytes(Tier.CPU) / plain.layer_bytes(Tier.CPU)
    assert 0.125 < ratio < 0.3  # fp32 model: 4 bits + 4 bytes per 64 (or 32) values, against 32 bits
    assert packed.host[0].numel() == packed.layer_bytes(Tier.CPU)
