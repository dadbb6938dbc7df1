"""Which requests decode together: the admission policy of ``Batcher`` (``batcher.py``).

Policy for dense caches stored exactly (``--offload none|cpu|auto``, any ``--recompute``, no lossy
``--kv-codec``/``--x-codec``):
one batch of ``max_rows`` rows and ``max_model_len`` token slots, allocated once at startup; every
row shares one token count ``S``, and a decode step reads (offloaded: copies) all rows' ``S``
slots, so ``S`` is what a join may cost the others. Slots beyond one request's prompt + answer buy
later joins at the price of every step reading them: an offloaded step's link bytes grow with
``S``, so the server's ``--max-model-len`` is best the longest request, not more.

1. An empty batch gathers an arrival wave: it starts once its rows are full, or once no request
   arrived for ``batch_wait_ms`` (at most ``GATHER_SPAN x batch_wait_ms`` after the oldest came),
   with the waiting requests in arrival order whose tokens fit together (longest prompt + longest
   answer within the slots), all in one prefill at ``S = 0``. Clients that send their next
   request as soon as the last one ended (a closed loop) arrive spread over the time the server
   takes to parse them; waiting for a quiet gap, not a fixed time after the first, starts them
   together instead of starting a few and joining the rest one by one.
2. Between two decode steps waiting requests take free rows of the running batch (continuous
   batching), all of them in one prefill on their own rows, written right-aligned into the ``S``
   tokens the batch already has: so only prompts of at most ``S`` tokens can join. A request may
   join if it ends no later than the batch would, or no more than ``JOIN_SLACK`` steps after the
   end the batch had when it started (backfill: a wave's stragglers, which reached the engine just
   after their batch started, join it instead of waiting a whole batch), or, while at most half the
   rows are live, if it is at the head of the queue and its answer fits the slots left. Others wait
   for the batch to finish: backfill never moves the batch's end past its start's plus
   ``JOIN_SLACK``, so a busy batch always drains. While a wave is still arriving (the newest
   request came less than ``JOIN_QUIET x batch_wait_ms`` ago, the oldest less than
   ``batch_wait_ms``, and fewer wait than rows are free) the join waits one step, if all waiting
   could still join then: one prefill instead of several.
3. A finished or cancelled request frees its row at the next step boundary; a batch with no live
   row starts again at ``S = 0``. Free rows keep decoding (their output is dropped). Requests never
   join a batch whose every live row ends with the step already queued: they start the next batch
   together at ``S = 0`` instead of joining at a long ``S``.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvpr.runtime.row_batch import FixedBatch, RowBatch
from kvpr.runtime.streams import TokenMailbox
from kvpr.serve.requests import QueuedStep, Sequence, ServeConfig

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.serve.metrics import EngineMetrics

GATHER_SPAN = 4  # an empty batch waits at most this many batch_wait_ms after its oldest request
JOIN_QUIET = 0.25  # a join waits a step while the newest arrival is this share of batch_wait_ms old
JOIN_SLACK = 4  # decode steps a backfill may end after the end its batch had when it started


class Admission:
    """The policy's half of ``Batcher``: starting batches and joining rows (the module docstring).
    The engine's state it reads and the event helpers it calls are ``Batcher``'s."""

    llm: LLM
    config: ServeConfig
    metrics: EngineMetrics | None
    pad_id: int
    lock: threading.Condition
    waiting: collections.deque[Sequence]
    live: dict[int, Sequence]
    admitting: list[Sequence]
    batch: RowBatch | FixedBatch | None
    rows_batch: RowBatch | None
    mailbox: TokenMailbox | None
    next_ids: torch.Tensor | None
    queued: QueuedStep | None
    planned_end: int  # S at which the running batch's rows end, as it started

    def _finish(self, sequence: Sequence, kind: str, value: str) -> None:
        raise NotImplementedError

    def _gauge_queue(self) -> None:
        raise NotImplementedError

    def _first_tokens(self, logits: torch.Tensor, rows: list[int], sequences: list[Sequence], joined: bool) -> None:
        raise NotImplementedError

    def _gather_left(self) -> float:
        """Seconds an empty batch still waits for more requests before it starts (under the lock):
        until its rows are full, or ``batch_wait_ms`` passed without an arrival (at most
        ``GATHER_SPAN`` times that after the oldest waiting request arrived)."""
        if self.live or not self.waiting or len(self.waiting) >= self.config.max_rows:
            return 0.0
        wait = self.config.batch_wait_ms / 1e3
        quiet_at = self.waiting[-1].arrival + wait
        return min(quiet_at, self.waiting[0].arrival + GATHER_SPAN * wait) - time.perf_counter()

    def _take_waiting(self, admissible: Callable[[Sequence, bool], bool], limit: int) -> list[Sequence]:
        """Pop up to ``limit`` waiting sequences that ``admissible(sequence, is_head)`` accepts, in
        queue order; cancelled ones are dropped on the way."""
        taken: list[Sequence] = []
        dropped: list[Sequence] = []
        with self.lock:
            kept: collections.deque[Sequence] = collections.deque()
            head = True
            while self.waiting:
                sequence = self.waiting.popleft()
                if sequence.cancelled:
                    dropped.append(sequence)
                elif len(taken) < limit and admissible(sequence, head):
                    taken.append(sequence)
                else:
                    kept.append(sequence)
                    head = False
            self.waiting = kept
        for sequence in dropped:
            self._finish(sequence, "done", "cancelled")
        self._gauge_queue()
        self.admitting = taken
        return taken

    def _steps_left(self, sequence: Sequence) -> int:
        """Decode steps ``sequence`` still needs beyond the step queued ahead, if any."""
        queued = self.queued
        return sequence.remaining - (1 if queued is not None and id(sequence) in queued.members else 0)

    def _admit(self) -> str | None:
        """Start a batch, or let waiting requests join the running one (see the module docstring).
        Returns the phase it ran: "start", "join" or None."""
        if not self.waiting:
            return None
        if not self.live:
            return "start" if self._start_batch() else None
        batch = self.batch
        if batch is None or not batch.joins_running:
            return None
        free = [row for row in range(batch.width) if row not in self.live]
        if not free:
            return None
        steps_left = max(self._steps_left(sequence) for sequence in self.live.values())
        if steps_left == 0:  # the batch ends with the step queued ahead: start the next one at S = 0
            return None
        length, capacity = batch.length, batch.capacity  # type: ignore[union-attr]
        underused = 2 * len(self.live) <= batch.width

        def admissible_at(s: int) -> Callable[[Sequence, bool], bool]:
            def admissible(sequence: Sequence, head: bool) -> bool:
                end = s + sequence.params.max_new_tokens - 1  # S once its last token is in
                backfill = max(length + steps_left, self.planned_end + JOIN_SLACK)
                limit = capacity if underused and head else min(capacity, backfill)
                return 0 < len(sequence.prompt_ids) <= s and batch.joins_running and end <= limit

            return admissible

        if self._wave_arriving(len(free), admissible_at(length + 1)):
            return None
        joining = self._take_waiting(admissible_at(length), len(free))
        if not joining:
            return None
        rows = free[: len(joining)]  # ascending: the rows form as few contiguous runs as possible
        logits = batch.join(rows, [sequence.prompt_ids for sequence in joining], self.pad_id)
        self._first_tokens(logits, rows, joining, joined=True)
        return "join"

    def _wave_arriving(self, free: int, admissible_next_step: Callable[[Sequence, bool], bool]) -> bool:
        """Whether a join had better wait one step for more of an arrival wave: requests are still
        arriving, fewer wait than rows are free, every waiting one could join after the step, and
        none has waited ``batch_wait_ms`` yet (so no request waits more than one step for this)."""
        wait = self.config.batch_wait_ms / 1e3
        with self.lock:
            waiting = list(self.waiting)
        now = time.perf_counter()
        if not waiting or len(waiting) >= free or now - waiting[0].arrival >= wait:
            return False
        if now - waiting[-1].arrival >= JOIN_QUIET * wait:
            return False
        return all(admissible_next_step(sequence, index == 0) for index, sequence in enumerate(waiting))

    def _start_batch(self) -> bool:
        """A new batch from the head of the queue: as many as fit its rows and slots together."""
        rows_batch = self.rows_batch
        width = self.config.max_rows if rows_batch is None else rows_batch.width
        capacity = self.config.max_model_len
        longest = [0, 0]  # the group's longest prompt and longest answer

        def admissible(sequence: Sequence, head: bool) -> bool:
            prompt_len, answer = len(sequence.prompt_ids), sequence.params.max_new_tokens - 1
            fits = max(longest[0], prompt_len) + max(longest[1], answer) <= capacity
            if fits:
                longest[0], longest[1] = max(longest[0], prompt_len), max(longest[1], answer)
            return fits

        starting = self._take_waiting(admissible, width)
        if not starting:
            return False
        self.queued = None  # a step queued ahead for rows that all ended: its tokens are not read
        prompts = [sequence.prompt_ids for sequence in starting]
        rows = list(range(len(starting)))
        if rows_batch is not None:
            rows_batch.reset()
            self.batch = rows_batch
        else:
            self.batch = None  # the last batch's cache is freed before the next is allocated
            executor = self.llm.make_executor(len(starting), longest[0] + longest[1] + 1)
            self.batch = FixedBatch(executor, len(starting))
        if self.mailbox is None or self.mailbox.slots[0].shape[0] != self.batch.width:
            self.mailbox = TokenMailbox(self.batch.width, self.llm.device)
        self.next_ids = torch.full((self.batch.width,), self.pad_id, dtype=torch.long, device=self.llm.device)
        logits = self.batch.start(rows, prompts, self.pad_id)
        self.planned_end = self.batch.length + max(s.params.max_new_tokens for s in starting) - 1
        if self.metrics is not None:
            self.metrics.batches.inc()
        self._first_tokens(logits, rows, starting, joined=False)
        return True
