"""The transformers runner of ``kvpr eval``: the same answers and scores as the engine where both run
a KIVI cache, the quanto peers' bytes, and which specs it measures."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import method_llm, token_prompts
from kvpr.compress.methods import parse_codec_spec
from kvpr.config import CacheConfig, Offload, SamplingParams
from kvpr.eval.harness import cache_for_spec, guard_tokens
from kvpr.eval.hf_runner import QUANTO_PEERS, TransformersRunner, runs_here

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, stop_on_eos=False)
SPEC = "kivi2:residual=32,token_group=16"  # short contexts still quantise several blocks


def test_specs_it_measures() -> None:
    """The quanto peers and KIVI specs ending in @hf; the engine runs every other KIVI spec."""
    assert all(runs_here(spec) for spec in (*QUANTO_PEERS, SPEC + "@hf", "kivi4@hf", "kivi3:rotate=v@hf"))
    engine = ("none", "int4", "kivi2", SPEC, "kivi4", "kivi3:rotate=v", "kivi2:rotate=kv", "kvo", "quest", "kvo@hf")
    assert not any(runs_here(spec) for spec in engine)
    configs = [(spec, cache_for_spec(spec)) for spec in ("kivi4:residual=256@hf", "hf-quanto-int2", "kvo")]
    assert configs[0][1].kv_codec == "none" and guard_tokens(configs) == 256
    kivi4 = CacheConfig(offload=Offload.CPU, kv_codec="kivi4", kv_codec_params=(("rotate", "v"),))
    assert cache_for_spec("kivi4:rotate=v") == kivi4  # the engine's, packed rows in host memory


@pytest.mark.parametrize("spec", [SPEC, "kivi4:residual=32,token_group=16,rotate=v"])
def test_runner_answers_and_scores_as_the_engine(tiny_checkpoint, spec: str) -> None:
    """Left-padded contexts, a question through the cache, greedy answers: the runner's KIVI layer
    under transformers gives the engine's tokens and log-probabilities (at 2 bits, and rotated at 4)."""
    name, params = parse_codec_spec(spec)
    llm = method_llm(tiny_checkpoint("llama-d32"), name, params=params)
    runner = TransformersRunner(llm, spec + "@hf")
    pairs = list(zip(token_prompts([150, 131], seed=5), token_prompts([5, 3], seed=6)))
    expected = [a.token_ids for a in llm.answer(pairs, GREEDY)]
    assert [a.token_ids for a in runner.answer(pairs, GREEDY)] == expected
    windows = token_prompts([120, 120], seed=7)
    # the two models' float32 sums differ in the last bits, which can flip a code sitting on a rounding
    # edge (one such flip moves a token's log-probability by ~0.01 under transformers 5.25): nearly every
    # token agrees to 2e-3, none is far off
    difference = (runner.score(windows, 40) - llm.score(windows, 40)).abs()  # [2, 80]
    assert (difference > 2e-3).float().mean().item() <= 0.02 and difference.max().item() < 0.05, difference.max()


def test_more_bits_stay_closer_to_uncompressed(tiny_checkpoint) -> None:
    llm = method_llm(tiny_checkpoint("llama-d32"))
    windows = token_prompts([120, 120], seed=8)
    exact = llm.score(windows, 40)
    error = {}
    for bits in (2, 3, 4):
        runner = TransformersRunner(llm, f"kivi{bits}:residual=32,token_group=16,rotate=v@hf")
        error[bits] = (runner.score(windows, 40) - exact).abs().mean().item()
        assert runner.footprint(64) == (runner.bytes_per_token(), runner.bytes_per_token())
    assert error[4] < error[3] < error[2]


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None, reason="needs optimum-quanto")
def test_quanto_peer_answers_and_counts_its_bytes(tiny_checkpoint) -> None:
    llm = method_llm(tiny_checkpoint("llama-d32"))
    for name, bits in QUANTO_PEERS.items():
        runner = TransformersRunner(llm, name)
        # 4 layers, 2 KV heads, head_dim 32: codes plus an fp16 scale and shift per 64 values
        assert runner.bytes_per_token() == 2 * 4 * 2 * (32 * bits / 8 + 4 * 32 / 64)
        answers = runner.answer(list(zip(token_prompts([150], seed=5), token_prompts([4], seed=6))), GREEDY)
        assert len(answers[0].token_ids) == GREEDY.max_new_tokens
