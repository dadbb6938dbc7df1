"""Attention over a cache in pieces, merged by log-sum-exp, equals attention over the whole cache."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpr.models.common import attend, attention_bias
from kvpr.runtime.split_attention import Partials, attend_piece, merge_partials
from kvpr.runtime.tiers import TierPlan, TierState


def one_piece(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The model's own attention over the concatenated cache: q [b, n_q, d], k, v [t, b, n_kv, d]."""
    bias = attention_bias(valid[:, None, None, :], q.dtype)  # [b, 1, 1, t]
    return attend(q.unsqueeze(2), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), bias)  # [b, 1, n_q * d]


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 3),
    n_kv=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    cuts=st.lists(st.integers(0, 9), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_pieces_merge_to_the_whole_attention(b: int, n_kv: int, group: int, cuts: list[int], seed: int) -> None:
    """Any cut of the tokens into pieces (empty ones too), any mask that leaves each row one token:
    the merged partials equal one attention over the whole cache (fp32, summation order only)."""
    gen = torch.Generator().manual_seed(seed)
    d, t = 8, sum(cuts) + 1
    q = torch.randn(b, n_kv * group, d, generator=gen)
    k, v = torch.randn(2, t, b, n_kv, d, generator=gen)
    valid = torch.rand(b, t, generator=gen) > 0.3
    valid[:, -1] = True  # every row attends at least its newest token
    partials, start = Partials(), 0
    for size in [*cuts, 1]:
        attend_piece(q, k[start : start + size], v[start : start + size], valid[:, start : start + size], partials)
        start += size
    torch.testing.assert_close(partials.merge(torch.float32), one_piece(q, k, v, valid), atol=1e-6, rtol=1e-5)


def test_a_piece_no_row_attends_weighs_nothing() -> None:
    """A piece fully masked for a row (a padded row's host chunk) has lse = -inf and adds nothing."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 8, generator=gen)
    k, v = torch.randn(2, 10, 2, 2, 8, generator=gen)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :6] = False  # row 0 sees nothing of the first piece
    partials = Partials()
    attend_piece(q, k[:6], v[:6], valid[:, :6], partials)
    assert torch.isneginf(partials.lse[0, 0]).all() and torch.isfinite(partials.lse[0, 1]).all()
    attend_piece(q, k[6:], v[6:], None, partials)
    torch.testing.assert_close(partials.merge(torch.float32), one_piece(q, k, v, valid), atol=1e-6, rtol=1e-5)


def test_tokens_no_row_attends_contribute_nothing_whatever_they_hold() -> None:
    """Slots no row attends may hold anything (a CUDA graph attends a tier's whole capacity, whose
    unused slots are uninitialised): NaN and inf there change nothing, as in the CUDA kernel."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 8, generator=gen)
    k, v = torch.randn(2, 12, 2, 2, 8, generator=gen)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[:, 9:] = False  # capacity beyond the length
    valid[1, :4] = False  # a left-padded row
    garbage_k, garbage_v = k.clone(), v.clone()
    garbage_k[9:], garbage_v[9:] = float("nan"), float("inf")
    garbage_v[:4, 1] = float("nan")
    clean, dirty = Partials(), Partials()
    attend_piece(q, k, v, valid, clean)
    attend_piece(q, garbage_k, garbage_v, valid, dirty)
    assert torch.isfinite(dirty.out).all()
    torch.testing.assert_close(dirty.merge(torch.float32), clean.merge(torch.float32), atol=0, rtol=0)


def test_merge_weights_partials_by_their_log_sum_exp() -> None:
    """Two partials with lse log 1 and log 3: the whole is 1/4 of the first plus 3/4 of the second."""
    out = torch.stack([torch.full((1, 1, 2), 4.0), torch.full((1, 1, 2), 8.0)])  # [P=2, b, n_q, d]
    lse = torch.log(torch.tensor([1.0, 3.0])).reshape(2, 1, 1)
    torch.testing.assert_close(merge_partials(out, lse), torch.full((1, 1, 2), 7.0))


def test_tier_plan_and_state_follow_the_tokens() -> None:
    """12 GPU slots with a tail of 4: 8 prompt tokens stay on the GPU for good, the rest of the
    prompt goes to the host, new tokens fill the tail and flush to the host in blocks of 4."""
    plan = TierPlan.for_capacity(12, 40, flush_block=4)
    assert (plan.gpu_slots, plan.prefix_cap, plan.host_slots, plan.tail_slots) == (12, 8, 32, 4)
    state = TierState(plan)
    assert state.place_prompt(20) == (8, 12)
    flushes = []
    for step in range(9):
        assert state.next_gpu_slot() == 8 + state.tail
        state.add_token()
        if state.tail_full():
            flushes.append(step)
            state.flushed()
    assert flushes == [3, 7] and (state.prefix, state.host, state.tail) == (8, 20, 1)
    assert TierPlan.for_capacity(50, 40) == TierPlan(40, 40, 40, 0) and not TierPlan.for_capacity(50, 40).offloads
    assert TierPlan.for_capacity(0, 40, flush_block=4).prefix_cap == 0  # at least the tail is on the GPU
    short = TierState(TierPlan.for_capacity(12, 40, flush_block=4))
    assert short.place_prompt(5) == (5, 0) and short.next_gpu_slot() == 5  # the prefix grows first


@pytest.mark.parametrize("capacity", [0, 3, 7])
def test_a_prompt_longer_than_the_batch_is_refused(capacity: int) -> None:
    state = TierState(TierPlan.for_capacity(capacity, 10, flush_block=2))
    with pytest.raises(ValueError, match="exceed the 10 slots"):
        state.place_prompt(11)
