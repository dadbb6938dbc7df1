"""The token loop: admission, joins, decode steps queued ahead, sampling, events to the callers.
Which requests decode together is ``admission.py``'s; where the loop runs, ``engine.py``'s (a
thread of the HTTP process) or ``engine_main.py``'s (the main thread of an engine process).

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
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvpr.errors import KvprError
from kvpr.runtime.row_batch import FixedBatch, RowBatch, supports_row_joins
from kvpr.runtime.sampling import make_generator, sample_next, sample_rows
from kvpr.runtime.streams import TokenMailbox
from kvpr.serve.admission import Admission
from kvpr.serve.requests import Event, QueuedStep, QueueFull, Sequence, ServeConfig, check_room, deliver_events

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.serve.metrics import EngineMetrics

log = logging.getLogger("kvpr.serve")


class Batcher(Admission):
    """Owns the engine: ``run`` is the token loop (``start`` runs it in a thread of its own);
    ``submit``, ``cancel`` and ``request_stop`` are thread-safe.

    Events leave the loop through ``outlet``, called on the loop's thread with a prefill's first
    tokens, with a decode step's tokens, and with what else a pass ended: ``("token", id)`` as each
    token is chosen, then ``("done", "eos" | "length" | "cancelled")``, or ``("error", message)`` if
    the engine failed.
    The default outlet calls each sequence's ``deliver`` with its own events, cancelled ones dropped.
    """

    def __init__(
        self,
        llm: LLM,
        config: ServeConfig,
        metrics: EngineMetrics | None = None,
        outlet: Callable[[list[Event]], None] = deliver_events,
    ) -> None:
        self.llm = llm
        self.config = config
        self.metrics = metrics
        self.outlet = outlet
        self.outbox: list[Event] = []  # events of this pass, not handed out yet (loop thread only)
        pad = llm.model_config.pad_token_id
        self.pad_id = pad if pad is not None and 0 <= pad < llm.model_config.vocab_size else 0
        self.eos_ids = set(llm.model_config.eos_token_ids)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.in_flight = 0  # submitted and not finished, waiting or live
        self.lock = threading.Condition()
        self.stopping = False
        self.live: dict[int, Sequence] = {}  # row -> sequence (the loop's thread only)
        self.admitting: list[Sequence] = []  # taken from the queue, not live yet (failed with a failing prefill)
        self.batch: RowBatch | FixedBatch | None = None
        self.rows_batch = self._make_row_batch()
        self.lookahead = llm.device.type == "cuda"  # queue step n + 1 before reading step n's tokens
        self.mailbox: TokenMailbox | None = None  # the batch's sampled ids on their way to the host
        self.next_ids: torch.Tensor | None = None  # [b] on the device: the next step's input tokens
        self.queued: QueuedStep | None = None
        self.planned_end = 0  # S at which the running batch's rows end, as it started
        self.last_read = 0.0  # perf_counter when the last step's tokens reached the host
        self.thread = threading.Thread(target=self.run, name="kvpr-engine", daemon=True)

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
        """Run the loop in a thread of this process."""
        self.thread.start()

    def stop(self) -> None:
        self.request_stop()
        if self.thread.is_alive():
            self.thread.join(timeout=30)

    def request_stop(self) -> None:
        """End the loop at its next pass: live and waiting requests get a shutting-down error."""
        with self.lock:
            self.stopping = True
            self.lock.notify_all()

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none. Raises QueueFull over the limits."""
        with self.lock:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            check_room(self.config, self.in_flight, len(sequences))
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

    # -- the loop's thread ---------------------------------------------------------------------------

    def _spent(self, phase: str, since: float) -> float:
        """Count the engine's time since ``since`` under ``phase``; returns now."""
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.spent(phase, now - since)
        return now

    def run(self) -> None:
        """The token loop, until ``request_stop``."""
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
        self._flush()

    def run_once(self, mark: float) -> float:
        """One pass of the engine loop, on the loop's thread (tests drive it directly): cancelled
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
        self._flush()
        return mark

    def _free_cancelled(self) -> None:
        for row, sequence in list(self.live.items()):
            if sequence.cancelled:
                del self.live[row]
                self._finish(sequence, "done", "cancelled")
                if self.metrics is not None:
                    self.metrics.cancelled.inc()

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
        for row, sequence, token in zip(rows, sequences, chosen):
            sequence.row = row
            self.live[row] = sequence
            if self.metrics is not None:
                self.metrics.ttft.observe(now - sequence.arrival)
                self.metrics.prompt_tokens.inc(len(sequence.prompt_ids))
                if joined:
                    self.metrics.joins.inc()
            self._take_token(sequence, token)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(sequences))
        self._flush()  # first tokens out now, not after the next decode step is queued

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
        sequences = [sequence for _, sequence in queued.rows if not sequence.done]  # not ended since
        for sequence in sequences:
            self._take_token(sequence, tokens[sequence.row])
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(sequences))
        if self.metrics is not None:
            self.metrics.observe_step(self.batch, took, sequences)
        self._flush()  # the step's events leave now, counted as delivery
        return self._spent("deliver", now)

    def _take_token(self, sequence: Sequence, token: int) -> None:
        sequence.generated += 1
        sequence.last_token = token
        self.outbox.append((sequence, "token", token))
        by_eos = token in self.eos_ids and sequence.params.stop_on_eos
        if by_eos or sequence.remaining <= 0:
            del self.live[sequence.row]
            self._finish(sequence, "done", "eos" if by_eos else "length")

    def _finish(self, sequence: Sequence, kind: str, value: str) -> None:
        if sequence.done:
            return
        sequence.done = True
        with self.lock:
            self.in_flight -= 1
        if self.metrics is not None:
            self.metrics.latency.observe(time.perf_counter() - sequence.arrival)
        self.outbox.append((sequence, kind, value))

    def _flush(self) -> None:
        """Hand the events gathered so far to the outlet, in one call."""
        if self.outbox:
            events, self.outbox = self.outbox, []
            self.outlet(events)

    def _fail(self, sequences: list[Sequence], message: str) -> None:
        for sequence in sequences:
            self._finish(sequence, "error", message)

    def _fail_live(self, message: str) -> None:
        live, self.live = list(self.live.values()), {}
        self.queued = None
        self._fail(live, message)
        if self.rows_batch is not None:
            try:
                self.rows_batch.reset()
            except Exception:  # the next batch's start will fail the same way and say so
                log.exception("resetting the batch failed")
