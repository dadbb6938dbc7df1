"""Decides which requests decode together, and runs the token loop in its own thread.

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
   join if it ends no later than the batch would (backfill), or, while at most half the rows are
   live, if it is at the head of the queue and its answer fits the slots left. Others wait for the
   batch to finish: backfill never moves the batch's end, so a busy batch always drains. While a
   wave is still arriving (the newest request came less than ``JOIN_QUIET x batch_wait_ms`` ago,
   the oldest less than ``batch_wait_ms``, and fewer wait than rows are free) the join waits one
   step, if all waiting could still join then: one prefill instead of several.
3. A finished or cancelled request frees its row at the next step boundary; a batch with no live
   row starts again at ``S = 0``. Free rows keep decoding (their output is dropped). Requests never
   join a batch whose every live row ends with the step already queued: they start the next batch
   together at ``S = 0`` instead of joining at a long ``S``.

On CUDA the loop queues decode step ``n + 1`` (its input: step ``n``'s tokens, chosen on the
device) before the host waits for step ``n``'s tokens, as ``generate_tokens`` does offline, so the
device never idles while the host streams tokens; joins and new batches go between two queued
steps. On a CPU every step runs when it is queued.

The cache methods (KVO, KIVI, H2O, StreamingLLM, Quest) and throughput mode build per-layer state in
one prefill, and a lossy host tier (int8, int4 K,V or X) stores a token differently depending on
where it lands: there batches run whole, and waiting requests start the next batch together when
the running one is done.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from kvpr.config import SamplingParams
from kvpr.errors import KvprError
from kvpr.runtime.row_batch import FixedBatch, RowBatch, supports_row_joins
from kvpr.runtime.sampling import make_generator, sample_next, sample_rows
from kvpr.runtime.streams import TokenMailbox

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.serve.metrics import ServeMetrics

log = logging.getLogger("kvpr.serve")

GATHER_SPAN = 4  # an empty batch waits at most this many batch_wait_ms after its oldest request
JOIN_QUIET = 0.25  # a join waits a step while the newest arrival is this share of batch_wait_ms old

Deliver = Callable[[list[tuple["Sequence", str, Any]]], None]  # (sequence, kind, value) events of one step


@dataclass(frozen=True)
class ServeConfig:
    """Limits of a server: rows decoded together, tokens per row, requests held beyond the rows."""

    max_rows: int = 8
    max_model_len: int = 2048  # a request's prompt + max_tokens, and the batch's token slots
    max_waiting: int = 32  # requests beyond max_rows held in the queue; more get HTTP 429
    batch_wait_ms: float = 20.0  # an empty batch starts after this long without a new arrival

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_model_len"):
            if getattr(self, name) < 1:
                raise KvprError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.max_waiting < 0:
            raise KvprError(f"--max-waiting {self.max_waiting}: must be >= 0")
        if not self.batch_wait_ms >= 0:
            raise KvprError(f"--batch-wait-ms {self.batch_wait_ms}: must be >= 0")


class QueueFull(Exception):
    """The server holds as many requests as its limits allow (HTTP 429)."""


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, sampling, and where it stands."""

    prompt_ids: list[int]
    params: SamplingParams
    tag: Any  # the caller's handle for its events (a choice index)
    deliver: Deliver
    arrival: float = field(default_factory=time.perf_counter)
    row: int = -1
    generated: int = 0
    last_token: int = 0
    cancelled: bool = False
    done: bool = False
    generator: torch.Generator | None = None

    @property
    def remaining(self) -> int:
        """Decode steps still needed: each step appends one token to every row."""
        return self.params.max_new_tokens - self.generated


@dataclass(eq=False)
class QueuedStep:
    """A decode step queued on the device whose tokens the host has not read yet."""

    rows: list[tuple[int, Sequence]]  # (row, sequence) of the live rows it decodes
    slot: int  # its tokens' mailbox slot
    queued: float  # perf_counter when it was queued
    members: set[int] = field(default_factory=set)  # id() of its sequences

    def __post_init__(self) -> None:
        self.members = {id(sequence) for _, sequence in self.rows}


class Batcher:
    """Owns the engine: a thread runs the token loop; ``submit`` and ``cancel`` are thread-safe.

    Events reach each sequence's ``deliver`` from the engine thread, batched per step:
    ``("token", id)`` as each token is chosen, then ``("done", "eos" | "length")``, or
    ``("error", message)`` if the engine failed.
    """

    def __init__(self, llm: LLM, config: ServeConfig, metrics: ServeMetrics | None = None) -> None:
        self.llm = llm
        self.config = config
        self.metrics = metrics
        pad = llm.model_config.pad_token_id
        self.pad_id = pad if pad is not None and 0 <= pad < llm.model_config.vocab_size else 0
        self.eos_ids = set(llm.model_config.eos_token_ids)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.in_flight = 0  # submitted and not finished, waiting or live
        self.lock = threading.Condition()
        self.stopping = False
        self.live: dict[int, Sequence] = {}  # row -> sequence (engine thread only)
        self.admitting: list[Sequence] = []  # taken from the queue, not live yet (failed with a failing prefill)
        self.batch: RowBatch | FixedBatch | None = None
        self.rows_batch = self._make_row_batch()
        self.lookahead = llm.device.type == "cuda"  # queue step n + 1 before reading step n's tokens
        self.mailbox: TokenMailbox | None = None  # the batch's sampled ids on their way to the host
        self.next_ids: torch.Tensor | None = None  # [b] on the device: the next step's input tokens
        self.queued: QueuedStep | None = None
        self.last_read = 0.0  # perf_counter when the last step's tokens reached the host
        self.thread = threading.Thread(target=self._run, name="kvpr-engine", daemon=True)

    @property
    def continuous(self) -> bool:
        """Whether requests join running batches (dense, exactly stored caches) or wait for the next."""
        return self.rows_batch is not None and self.rows_batch.joins_running

    def _make_row_batch(self) -> RowBatch | None:
        """The dense cache of ``max_rows`` x ``max_model_len``, allocated once; None where the
        placement's executor cannot take rows mid-run."""
        if self.llm.config.throughput is not None or not self._dense():
            return None
        executor = self.llm.make_executor(self.config.max_rows, self.config.max_model_len)
        return RowBatch(executor) if supports_row_joins(executor) else None

    def _dense(self) -> bool:
        from kvpr.config import CACHE_METHODS

        return self.llm.config.cache.kv_codec not in CACHE_METHODS

    # -- the caller's side (any thread) -------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.thread.join(timeout=30)

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none. Raises QueueFull over the limits."""
        limit = self.config.max_rows + self.config.max_waiting
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if self.in_flight + len(sequences) > limit:
                raise QueueFull(
                    f"the server holds {self.in_flight} requests ({self.config.max_rows} rows decoding, "
                    f"{self.config.max_waiting} waiting at most): retry later"
                )
            self.in_flight += len(sequences)
            self.waiting.extend(sequences)
            self.lock.notify_all()
        self._gauge_queue()

    def cancel(self, sequences: list[Sequence]) -> None:
        """The client went away (or a stop sequence ended the choice): free the rows at the next
        step boundary, drop the waiting ones."""
        with self.lock:
            for sequence in sequences:
                sequence.cancelled = True
            self.lock.notify_all()

    def _gauge_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.waiting))

    # -- the engine thread --------------------------------------------------------------------------

    def _spent(self, phase: str, since: float) -> float:
        """Count the engine's time since ``since`` under ``phase``; returns now."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.spent(phase, now - since)
        return now

    def _run(self) -> None:
        mark = time.perf_counter()
        while True:
            with self.lock:
                if not self.stopping and not self.waiting and not self.live:
                    mark = self._spent("other", mark)
                    while not self.stopping and not self.waiting and not self.live:
                        self.lock.wait()
                    mark = self._spent("idle", mark)
                if self.stopping:
                    break
                gather = self._gather_left()
                if gather > 0:  # an empty batch waits for the rest of an arrival wave
                    mark = self._spent("other", mark)
                    self.lock.wait(timeout=gather)
                    mark = self._spent("gather", mark)
                    continue
            mark = self.run_once(mark)
        self._fail_live("the server is shutting down")
        with self.lock:
            waiting, self.waiting = list(self.waiting), collections.deque()
        self._fail(waiting, "the server is shutting down")

    def run_once(self, mark: float) -> float:
        """One pass of the engine loop, on the engine thread (tests drive it directly): cancelled
        rows freed, a batch started or requests joined, a decode step queued and one read.
        ``mark``: when the engine's time was last counted; returns the new mark."""
        try:
            self._free_cancelled()
            mark = self._spent("other", mark)
            mark = self._spent(self._admit() or "other", mark)
            if self.live:
                mark = self._advance(mark)
            else:
                self.queued = None  # every row ended: a step queued ahead is discarded
        except Exception as err:  # the engine failed: end every live request, keep serving
            log.exception("engine step failed")
            message = str(err).splitlines()[0] if isinstance(err, KvprError) else f"engine failure: {err!r}"
            self._fail(self.admitting, message)
            self._fail_live(message)
        self.admitting = []
        if self.metrics is not None:
            self.metrics.running_rows.set(len(self.live))
        return mark

    def _gather_left(self) -> float:
        """Seconds an empty batch still waits for more requests before it starts (under the lock):
        until its rows are full, or ``batch_wait_ms`` passed without an arrival (at most
        ``GATHER_SPAN`` times that after the oldest waiting request arrived)."""
        if self.live or not self.waiting or len(self.waiting) >= self.config.max_rows:
            return 0.0
        wait = self.config.batch_wait_ms / 1e3
        quiet_at = self.waiting[-1].arrival + wait
        return min(quiet_at, self.waiting[0].arrival + GATHER_SPAN * wait) - time.perf_counter()

    def _free_cancelled(self) -> None:
        events: list[tuple[Sequence, str, Any]] = []
        for row, sequence in list(self.live.items()):
            if sequence.cancelled:
                del self.live[row]
                self._finish(sequence, events, "done", "cancelled")
                if self.metrics is not None:
                    self.metrics.cancelled.inc()
        self._send(events)

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
            self._finish(sequence, [], "done", "cancelled")
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
                limit = capacity if underused and head else min(capacity, length + steps_left)
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
        if self.metrics is not None:
            self.metrics.batches.inc()
        self._first_tokens(logits, rows, starting, joined=False)
        return True

    def _first_tokens(self, logits: torch.Tensor, rows: list[int], sequences: list[Sequence], joined: bool) -> None:
        """Each new sequence's first token, from its prompt's logits [k, V]; also the next step's
        input on their rows."""
        device = logits.device
        for sequence in sequences:
            sequence.generator = make_generator(sequence.params, device)
        chosen = sample_rows(
            logits, list(range(len(rows))), [s.params for s in sequences], [s.generator for s in sequences]
        )
        assert self.next_ids is not None
        self.next_ids[torch.tensor(rows, device=device)] = torch.tensor(chosen, device=device)
        now = time.perf_counter()
        events: list[tuple[Sequence, str, Any]] = []
        for row, sequence, token in zip(rows, sequences, chosen):
            sequence.row = row
            self.live[row] = sequence
            if self.metrics is not None:
                self.metrics.ttft.observe(now - sequence.arrival)
                self.metrics.prompt_tokens.inc(len(sequence.prompt_ids))
                if joined:
                    self.metrics.joins.inc()
            self._take_token(sequence, token, events)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(sequences))
        self._send(events)

    def _advance(self, mark: float) -> float:
        """Queue the next decode step unless every row ends with the one queued ahead; then read
        the step queued ahead (CUDA), or this one (CPU). Returns the time it ended."""
        queued, new = self.queued, None
        if queued is None or any(self._steps_left(sequence) > 0 for sequence in self.live.values()):
            new = self._queue_step()
        if self.lookahead:
            self.queued = new
            if queued is not None:
                mark = self._read(queued, mark)
        elif new is not None:
            mark = self._read(new, mark)
        return mark

    def _queue_step(self) -> QueuedStep:
        """One decode step of the batch on the device: every row's next token, chosen there."""
        batch, mailbox, ids = self.batch, self.mailbox, self.next_ids
        assert batch is not None and mailbox is not None and ids is not None
        began = time.perf_counter()
        logits = batch.step(ids)  # [b, V]
        chosen = logits.argmax(dim=-1)  # [b]: greedy rows, and the ignored free rows
        for row, sequence in self.live.items():
            if sequence.params.temperature != 0:  # a sampled row draws alone, from its own generator
                chosen[row] = sample_next(logits[row : row + 1], sequence.params, sequence.generator)[0]
        self.next_ids = chosen
        return QueuedStep(list(self.live.items()), mailbox.post(chosen), began)

    def _read(self, queued: QueuedStep, mark: float) -> float:
        """Wait for a queued step's tokens and hand them to its rows' requests."""
        assert self.mailbox is not None and self.batch is not None
        tokens = self.mailbox.read(queued.slot)
        now = self._spent("step", mark)
        took = now - max(queued.queued, self.last_read)  # the device's time per token when pipelined
        self.last_read = now
        events: list[tuple[Sequence, str, Any]] = []
        sequences = [sequence for _, sequence in queued.rows if not sequence.done]  # not ended since
        for sequence in sequences:
            self._take_token(sequence, tokens[sequence.row], events)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(sequences))
        if self.metrics is not None:
            self.metrics.observe_step(self.batch, took, sequences)
        self._send(events)
        return self._spent("deliver", now)

    def _take_token(self, sequence: Sequence, token: int, events: list[tuple[Sequence, str, Any]]) -> None:
        sequence.generated += 1
        sequence.last_token = token
        events.append((sequence, "token", token))
        by_eos = token in self.eos_ids and sequence.params.stop_on_eos
        if by_eos or sequence.remaining <= 0:
            del self.live[sequence.row]
            self._finish(sequence, events, "done", "eos" if by_eos else "length")

    def _finish(self, sequence: Sequence, events: list[tuple[Sequence, str, Any]], kind: str, value: Any) -> None:
        if sequence.done:
            return
        sequence.done = True
        with self.lock:
            self.in_flight -= 1
        if self.metrics is not None:
            self.metrics.latency.observe(time.perf_counter() - sequence.arrival)
        if kind != "done" or value != "cancelled":  # a cancelled sequence's caller stopped listening
            events.append((sequence, kind, value))

    def _send(self, events: list[tuple[Sequence, str, Any]]) -> None:
        """Hand a step's events to their callers, one call per caller."""
        by_caller: dict[int, tuple[Deliver, list[tuple[Sequence, str, Any]]]] = {}
        for event in events:
            deliver = event[0].deliver
            by_caller.setdefault(id(deliver), (deliver, []))[1].append(event)
        for deliver, caller_events in by_caller.values():
            deliver(caller_events)

    def _fail(self, sequences: list[Sequence], message: str) -> None:
        events: list[tuple[Sequence, str, Any]] = []
        for sequence in sequences:
            self._finish(sequence, events, "error", message)
        self._send(events)

    def _fail_live(self, message: str) -> None:
        live, self.live = list(self.live.values()), {}
        self.queued = None
        self._fail(live, message)
        if self.rows_batch is not None:
            try:
                self.rows_batch.reset()
            except Exception:  # the next batch's start will fail the same way and say so
                log.exception("resetting the batch failed")


def request_seed(seed: int | None, choice: int) -> int:
    """Choice ``choice``'s sampling seed: ``seed + choice`` when the client gave one (so a seeded
    request repeats), else fresh randomness."""
    return secrets.randbits(63) if seed is None else (seed + choice) % 2**63
