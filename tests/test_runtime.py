"""Every execution path gives the same greedy tokens as the GPU-resident run (and the oracle)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import cpu_llm
from kvpr.config import SamplingParams
from kvpr.runtime.batch import BatchState
from kvpr.runtime.latency import chunk_bounds
from kvpr.scheduler.policy import round_fraction

PATHS = [
    ("cpu", "off", True),
    ("cpu", 0.0, True),
    ("cpu", 0.25, True),
    ("cpu", 0.5, True),
    ("cpu", 1.0, True),
    ("cpu", 0.5, False),
    ("cpu", 1.0, False),
    ("none", "off", False),
]
PROMPTS = {1: [[5, 17, 33, 2, 90, 11]], 3: [[5, 17, 33, 2, 90, 11], [7, 7, 61], [100, 3, 44, 21, 9, 8, 71, 12, 4]]}


@pytest.mark.parametrize("family", ["llama-gqa", "opt", "qwen2"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_tokens_equal_across_paths(tiny_checkpoint, family: str, batch_size: int) -> None:
    directory = tiny_checkpoint(family)
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = [c.token_ids for c in cpu_llm(directory).generate(PROMPTS[batch_size], params)]
    assert all(len(tokens) == 12 for tokens in reference)
    for offload, recompute, overlap in PATHS:
        llm = cpu_llm(directory, offload, recompute, overlap)
        tokens = [c.token_ids for c in llm.generate(PROMPTS[batch_size], params)]
        assert tokens == reference, (offload, recompute, overlap)
        if offload == "cpu" and recompute not in ("off", 0.0):
            assert max(llm.last_stats.recompute_lens) > 0


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_batched_equals_one_by_one(tiny_checkpoint, family: str) -> None:
    """Left padding changes nothing: each row of a batch equals the same prompt run alone."""
    llm = cpu_llm(tiny_checkpoint(family), "cpu", 0.5)
    params = SamplingParams(max_new_tokens=10, stop_on_eos=False)
    batched = [c.token_ids for c in llm.generate(PROMPTS[3], params)]
    alone = [llm.generate([prompt], params)[0].token_ids for prompt in PROMPTS[3]]
    assert batched == alone


def test_recompute_fraction_follows_context(tiny_checkpoint) -> None:
    """The fraction applies to the host tier: the whole prompt (no GPU prefix), then the GPU tail's
    tokens once its block of 4 (conftest's flush block) has been flushed after decode step 3."""
    llm = cpu_llm(tiny_checkpoint("llama-gqa"), "cpu", 0.25)
    llm.generate([[5, 6, 7, 8, 9, 10, 11, 12]], SamplingParams(max_new_tokens=6, stop_on_eos=False))
    assert llm.last_stats.host_lens == [8, 8, 8, 8, 12]
    assert llm.last_stats.recompute_lens == [round_fraction(0.25, h) for h in (8, 8, 8, 8, 12)]


def test_sampling_is_seeded_and_stops_on_eos(tiny_checkpoint) -> None:
    llm = cpu_llm(tiny_checkpoint("opt"), "cpu", 0.5)
    params = SamplingParams(max_new_tokens=20, temperature=1.5, top_p=0.9, seed=3, stop_on_eos=False)
    first = llm.generate(PROMPTS[3], params)
    second = llm.generate(PROMPTS[3], params)
    assert [c.token_ids for c in first] == [c.token_ids for c in second]
    greedy = llm.generate(PROMPTS[3], SamplingParams(max_new_tokens=20, stop_on_eos=False))
    assert [c.token_ids for c in first] != [c.token_ids for c in greedy]
    # Make the first greedy token of row 0 the EOS: that row stops at once, the others go on.
    eos = greedy[0].token_ids[0]
    llm.model_config = dataclasses.replace(llm.model_config, eos_token_ids=(eos,))
    stopped = llm.generate(PROMPTS[3], SamplingParams(max_new_tokens=20))
    assert stopped[0].token_ids == [eos] and stopped[0].finish_reason == "eos"
    for row in (1, 2):
        expected = greedy[row].token_ids
        cut = expected.index(eos) + 1 if eos in expected else len(expected)
        assert stopped[row].token_ids == expected[:cut]


def test_batch_state_positions_and_mask() -> None:
    state = BatchState(batch_size=2, max_len=6, device=torch.device("cpu"))
    positions, mask = state.append(torch.tensor([[False, True, True], [True, True, True]]))
    assert positions.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert mask.shape == (2, 1, 3, 3)
    assert mask[0, 0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    positions, mask = state.append(torch.tensor([[True], [True]]))
    assert positions.tolist() == [[2], [3]]
    assert mask[:, 0, 0].tolist() == [[False, True, True, True], [True, True, True, True]]


@pytest.mark.parametrize("length,chunks", [(0, 4), (1, 4), (10, 3), (16, 16), (5, 8)])
def test_chunk_bounds_cover_the_range(length: int, chunks: int) -> None:
    bounds = chunk_bounds(length, chunks)
    covered = [t for start, end in bounds for t in range(start, end)]
    assert covered == list(range(length))
    assert len(bounds) <= chunks and all(end > start for start, end in bounds)


def test_auto_on_gqa_never_stores_inputs(tiny_checkpoint) -> None:
    """The GQA test model's X (h=64) is as large as its K,V (2 * 2 heads * 16): recomputing cannot
    pay, so auto keeps no X at all; OPT (MHA, X half of K,V) keeps it."""
    from kvpr.scheduler.policy import recompute_can_pay

    gqa = cpu_llm(tiny_checkpoint("llama-gqa"), "cpu", "auto")
    assert not recompute_can_pay(gqa.model_config, 4, 4)
    executor = gqa.make_executor(1, 16)
    assert not executor.storage.store_inputs
    mha = cpu_llm(tiny_checkpoint("opt"), "cpu", "auto")
    assert recompute_can_pay(mha.model_config, 4, 4) and mha.make_executor(1, 16).storage.store_inputs


def test_score_equals_generate_logprobs(tiny_checkpoint) -> None:
    """Teacher-forced scores through the offloaded split equal those of the resident cache."""
    llm = cpu_llm(tiny_checkpoint("opt"), "cpu", 0.5)
    prompt = PROMPTS[3][2]
    tokens = llm.generate([prompt], SamplingParams(max_new_tokens=6, stop_on_eos=False))[0].token_ids
    scores = llm.score([prompt + tokens], prefix_len=len(prompt))
    assert scores.shape == (1, 6)
    resident = cpu_llm(tiny_checkpoint("opt")).score([prompt + tokens], prefix_len=len(prompt))
    torch.testing.assert_close(scores, resident, atol=1e-5, rtol=0)
    assert (scores <= 0).all() and (scores > -20).all()


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize("resident", [2, 5, 100])
def test_gpu_resident_prefix_gives_the_same_tokens(tiny_checkpoint, family: str, resident: int) -> None:
    """Tokens [0, r) kept on the device, [r, r+l) recomputed, the rest copied: same greedy tokens.
    r = 100 exceeds every prompt, so the whole prompt stays resident and only new tokens travel."""
    from conftest import make_llm

    directory = tiny_checkpoint(family)
    params = SamplingParams(max_new_tokens=10, stop_on_eos=False)
    reference = [c.token_ids for c in cpu_llm(directory).generate(PROMPTS[3], params)]
    for recompute in ("off", 0.5, 1.0):
        for overlap in (True, False):
            llm = make_llm(directory, "cpu", recompute, overlap, gpu_resident=resident)
            assert [c.token_ids for c in llm.generate(PROMPTS[3], params)] == reference, (recompute, overlap)
            # GPU slots: max(r, 4) with a tail of 4 (conftest's flush block), the rest a prefix that
            # stays; the tail flushes to the host after every 4th step. r = 100: no host tier.
            prefix = 0 if resident >= 19 else max(resident, 4) - 4
            host = [0] * 9 if resident >= 19 else [9 - prefix + 4 * (step // 4) for step in range(9)]
            assert llm.last_stats.host_lens == host
            assert llm.last_stats.recompute_lens == [
                round_fraction(recompute, h) if recompute != "off" else 0 for h in host
            ]


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
def test_chunk_count_may_change_every_step(tiny_checkpoint, family: str) -> None:
    """The scheduler picks l and the chunk count per step: the overlapped executor, switching
    between 1, 5 and 2 chunks (more than any step before, then fewer), equals the resident cache."""
    from kvpr.scheduler.plan import StepSplit

    directory = tiny_checkpoint(family)
    ids = torch.tensor([PROMPTS[3][2]], dtype=torch.long)  # [1, 9]
    valid = torch.ones_like(ids, dtype=torch.bool)
    resident = cpu_llm(directory).make_executor(1, 9)
    offloaded = cpu_llm(directory, "cpu", 0.5).make_executor(1, 9)
    counts = iter([1, 5, 2, 5, 1])
    offloaded.split = lambda s: StepSplit(s - 1, next(counts))
    expected = [resident.prefill(ids[:, :4], valid[:, :4])[:, -1]]
    expected += [resident.decode(ids[:, t]) for t in range(4, 9)]
    got = [offloaded.prefill(ids[:, :4], valid[:, :4])[:, -1]]
    staging = offloaded.staging_bytes
    got += [offloaded.decode(ids[:, t]) for t in range(4, 9)]
    assert staging == offloaded.staging_bytes > 0  # fixed rings, whatever the chunk count
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), atol=1e-5, rtol=0)
    assert offloaded.host_lens == [4, 4, 4, 4, 8]  # the 4-token tail flushed after the 4th step
    assert offloaded.recompute_lens == [3, 3, 3, 3, 7]


def test_an_executor_with_a_step_graph_is_freed_when_dropped(tiny_checkpoint) -> None:
    """The CUDA-graph holder keeps no reference back to its executor: a cycle would keep the whole
    cache allocated until the garbage collector ran, and ``--offload auto`` plans the next batch
    against the memory still held (checked with the collector off)."""
    import gc
    import weakref

    from kvpr.runtime.graphs import StepGraphs

    executor = cpu_llm(tiny_checkpoint("llama-gqa")).make_executor(2, 16)
    assert executor.graphs is None  # no CUDA: every step eager
    executor.graphs = StepGraphs(executor, host_steps=True)
    dropped = weakref.ref(executor)
    gc.disable()
    try:
        del executor
        assert dropped() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("family", ["llama-gqa", "opt"])
@pytest.mark.parametrize(
    "offload,recompute,resident", [("none", "off", 0), ("cpu", 0.5, 0), ("cpu", 1.0, 5), ("cpu", "off", 5)]
)
def test_the_graph_step_body_equals_the_eager_step(tiny_checkpoint, family: str, offload, recompute, resident) -> None:
    """What a CUDA graph records (``StepGraphs``: the new K,V and X written by ``index_copy_`` at
    device slots, the GPU tier attended over its whole capacity masked by validity, the recomputed
    tokens' rotary tables read from the batch state, static token and position buffers, loads
    forked from the compute stream) gives the sequential oracle's logits, step after step, on a
    left-padded batch: resident, and offloaded with recompute chunks, copied K,V chunks, a GPU
    prefix and tail flushes between the graphed steps. Run here without capture, as it runs off
    CUDA: every step that flushes nothing takes the static body."""
    from conftest import make_config
    from kvpr.api import LLM
    from kvpr.runtime.generation import left_pad
    from kvpr.runtime.graphs import StepGraphs

    prompts = [[5, 17, 33, 2, 90, 11], [7, 7, 61], [100, 3, 44, 21, 9, 8, 71, 12, 4]]
    ids, valid = left_pad(prompts, 0, torch.device("cpu"))  # [3, 9]
    runs, static_steps = [], []
    for overlap in (True, False):
        config = make_config(tiny_checkpoint(family), offload, recompute, overlap=overlap, gpu_resident=resident)
        executor = LLM(config).make_executor(3, 9 + 10)
        if overlap:
            executor.graphs = StepGraphs(executor, host_steps=True)

            def counted(*args, original=executor.static_step):  # noqa: ANN002, ANN202
                static_steps.append(args[-1].host_len)
                return original(*args)

            executor.static_step = counted
        logits = [executor.prefill(ids, valid)[:, -1]]
        for _ in range(10):
            logits.append(executor.decode(logits[-1].argmax(-1)))
        runs.append(torch.stack(logits))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-4, rtol=1e-4)
    flushes = (
        0
        if offload == "none"
        else sum(1 for host, nxt in zip(executor.host_lens, executor.host_lens[1:]) if nxt > host)
    )
    assert len(static_steps) == 10 - flushes and (offload == "none" or max(static_steps) > 0)
