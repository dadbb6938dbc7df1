"""The token loop: prefill, then decode and sample until every row stops."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from kvpr.config import SamplingParams
from kvpr.runtime.executor import Executor
from kvpr.runtime.sampling import make_generator, sample_next
from kvpr.runtime.streams import TokenMailbox

TokenCallback = Callable[[int, int], None]  # (row, token id), called as each token is chosen


@dataclass
class GenerationOutput:
    """New tokens of every row (EOS included when hit) and what the run cost."""

    tokens: list[list[int]]
    finished_by_eos: list[bool]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    recompute_lens: list[int] = field(default_factory=list)


def generate_tokens(
    executor: Executor,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    params: SamplingParams,
    eos_ids: tuple[int, ...],
    on_token: TokenCallback | None = None,
) -> GenerationOutput:
    """Run one batch to completion. input_ids, valid: [b, q] on the executor's device."""
    b = input_ids.shape[0]
    generator = make_generator(params, input_ids.device)
    mailbox = TokenMailbox(b, input_ids.device)
    tokens: list[list[int]] = [[] for _ in range(b)]
    stopped = [False] * b
    step_s: list[float] = []

    start = time.perf_counter()
    ids = sample_next(executor.prefill(input_ids, valid)[:, -1], params, generator)  # [b]
    slot = mailbox.post(ids)
    last = start
    for step in range(params.max_new_tokens):
        has_next = step + 1 < params.max_new_tokens
        if has_next:  # queue the next step before the host waits for this one's tokens
            with record_function("kvpr.decode_step"):  # one step per span in a --trace
                next_ids = sample_next(executor.decode(ids), params, generator)
            next_slot = mailbox.post(next_ids)
        host_ids = mailbox.read(slot)  # the one wait per step: the host needs tokens to stream and stop
        now = time.perf_counter()
        if step == 0:
            prefill_s = now - start
        else:
            step_s.append(now - last)
        last = now
        for row, token in enumerate(host_ids):
            if not stopped[row]:
                tokens[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        stopped = [s or (t in eos_ids and params.stop_on_eos) for s, t in zip(stopped, host_ids)]
        if all(stopped) or not has_next:
            break  # a step queued ahead is discarded
        ids, slot = next_ids, next_slot
    executor.finish()
    return GenerationOutput(
        tokens=tokens,
        finished_by_eos=stopped,
        prefill_s=prefill_s,
        step_s=step_s,
        recompute_lens=list(executor.recompute_lens),
    )
