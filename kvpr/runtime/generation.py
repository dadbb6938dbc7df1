"""The token loop: prefill, then feed any forced tokens, then decode and sample until every row stops.

A server drives the same executors step by step instead (``kvpr.runtime.row_batch``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
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
    """New tokens of every row (EOS included when hit) and what the run cost.

    ``prefill_s`` runs from the start to the first new token on the host (prefill plus any forced
    tokens); ``step_s`` holds one entry per later token, the time between two tokens on the host.
    """

    tokens: list[list[int]]
    finished_by_eos: list[bool]
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    recompute_lens: list[int] = field(default_factory=list)  # l at each decode step
    host_lens: list[int] = field(default_factory=list)  # host-tier tokens at each decode step


def generate_tokens(
    executor: Executor,
    input_ids: torch.Tensor,
    valid: torch.Tensor,
    params: SamplingParams,
    eos_ids: tuple[int, ...],
    on_token: TokenCallback | None = None,
    forced_ids: torch.Tensor | None = None,
) -> GenerationOutput:
    """Run one batch to completion. input_ids, valid: [b, q] on the executor's device.

    ``forced_ids`` [b, f]: tokens fed one decode step each after the prefill (teacher forcing), so
    that they attend to the cache as the executor keeps it (compressed, evicted, offloaded) and not
    to the prefill's dense K,V; the first new token is then sampled from the last forced step's
    logits, never from the prefill's.

    On CUDA the next decode step is queued before the host waits for this step's tokens, so the
    device never idles between steps; elsewhere every call runs synchronously, and queuing ahead
    would only shift each step's time into the previous token's.
    """
    b = input_ids.shape[0]
    generator = make_generator(params, input_ids.device)
    mailbox = TokenMailbox(b, input_ids.device)
    lookahead = mailbox.enabled
    tokens: list[list[int]] = [[] for _ in range(b)]
    stopped = [False] * b
    step_s: list[float] = []

    start = time.perf_counter()
    logits = executor.prefill(input_ids, valid)[:, -1]  # [b, V]
    if forced_ids is not None:
        for position in range(forced_ids.shape[1]):
            logits = executor.decode(forced_ids[:, position])  # [b, V]
    ids = sample_next(logits, params, generator)  # [b]
    slot = mailbox.post(ids)
    prefill_s, last = 0.0, start

    def queue_next(current: torch.Tensor) -> tuple[torch.Tensor, int]:
        with record_function("kvpr.decode_step"):  # one step per span in a --trace
            chosen = sample_next(executor.decode(current), params, generator)
        return chosen, mailbox.post(chosen)

    for step in range(params.max_new_tokens):
        has_next = step + 1 < params.max_new_tokens
        if has_next and lookahead:  # queue the next step before the host waits for this one's tokens
            next_ids, next_slot = queue_next(ids)
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
        if not lookahead:  # synchronous devices: the step runs now and is timed with the next read
            next_ids, next_slot = queue_next(ids)
        ids, slot = next_ids, next_slot
    executor.finish()
    return GenerationOutput(
        tokens=tokens,
        finished_by_eos=stopped,
        prefill_s=prefill_s,
        step_s=step_s,
        recompute_lens=list(executor.recompute_lens),
        host_lens=list(getattr(executor, "host_lens", ())),
    )


# -- step-wise generation for a server: rows that join and leave between decode steps ---------------


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded into one block: ids and validity [k, q] on ``device``."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        valid[row, width - len(ids) :] = True
    return input_ids.to(device), valid.to(device)
