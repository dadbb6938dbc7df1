"""The token loop in a process of its own (``engine_main.py``), seen from the HTTP process.

The HTTP process keeps the handlers, tokenization, detokenization and SSE formatting; the engine
process issues the kernels without sharing a GIL with them. A reader thread here takes the
engine's messages off the pipe and hands each to the event loop in one ``call_soon_threadsafe``.
The HTTP side counts the sequences in flight itself (a sequence leaves when the engine reports it
done, cancelled or failed), so 429 is decided here without asking the engine. If the engine
process dies, every pending sequence ends with ``("unavailable", why)`` (HTTP 503), and so does
every later submit.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait as connection_wait
from pathlib import Path
from typing import Any

from kvpr.errors import KvprError
from kvpr.serve.engine import EngineInfo
from kvpr.serve.engine_main import engine_main
from kvpr.serve.metrics import EngineSnapshot
from kvpr.serve.requests import EngineUnavailable, Event, QueueFull, Sequence, check_room, deliver_events
from kvpr.serve.wire import (
    Cancel,
    EngineSpec,
    MetricsReply,
    MetricsRequest,
    Ready,
    Shutdown,
    StartFailed,
    StepEvents,
    Submit,
    Submitted,
)

METRICS_WAIT_S = 10.0  # /metrics answers with the last snapshot if the engine takes longer
STOP_WAIT_S = 30.0  # a clean stop's wait before the engine process is terminated


class ProcessEngine:
    """Starts the engine process and waits for it to be ready (``KvprError``: its one-line
    refusal, a bad model or a memory check); then talks to it over one pipe."""

    def __init__(self, spec: EngineSpec) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, theirs = context.Pipe()
        # not a daemon: the engine may start processes of its own (compile workers)
        self.process = context.Process(target=engine_main, args=(theirs, spec), name="kvpr-engine")
        with _sigint_ignored():  # a Ctrl-C while it imports would print its traceback: ours to handle
            self.process.start()
        theirs.close()  # the engine's end is the engine's only: its exit is the pipe's end here
        try:
            self.info = self._wait_ready()
            self.tokenizer = _tokenizer(self.info)
        except BaseException:
            self._end_process(0.0)
            raise
        self.metrics = EngineSnapshot()
        self.send_lock = threading.Lock()
        self.keys = itertools.count()
        self.pending: dict[int, Sequence] = {}  # key -> sequence the engine has not finished
        self.key_of: dict[int, int] = {}  # id(sequence) -> key
        self.lost: str | None = None  # why the engine is gone
        self.stopping = False
        self.metrics_waiters: list[asyncio.Future[None]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.reader = threading.Thread(target=self._read, name="kvpr-engine-reader", daemon=True)

    def _wait_ready(self) -> EngineInfo:
        try:
            first = self.conn.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise KvprError(
                f"the engine process exited ({_exit_text(self.process.exitcode)}) before it was ready: "
                "see the messages above"
            ) from None
        if isinstance(first, StartFailed):
            self.process.join(timeout=STOP_WAIT_S)
            if first.user_error:
                raise KvprError(first.message)
            raise RuntimeError(first.message)
        assert isinstance(first, Ready), first
        return first.info

    # -- on the event loop ----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reader.start()

    def submit(self, sequences: list[Sequence]) -> None:
        if self.lost is not None:
            raise EngineUnavailable(self.lost)
        if self.stopping:
            raise QueueFull("the server is shutting down")
        check_room(self.info.limits, len(self.pending), len(sequences))
        keyed = [(next(self.keys), sequence) for sequence in sequences]
        try:
            self._send(Submit([Submitted(key, s.prompt_ids, s.params, s.arrival) for key, s in keyed]))
        except OSError:
            raise EngineUnavailable("the engine process is gone: restart kvpr serve") from None
        for key, sequence in keyed:
            self.pending[key] = sequence
            self.key_of[id(sequence)] = key

    def cancel(self, sequences: list[Sequence]) -> None:
        keys = [self.key_of[id(s)] for s in sequences if id(s) in self.key_of]
        if keys and self.lost is None:
            try:
                self._send(Cancel(keys))
            except OSError:  # the reader is about to report the engine gone
                pass

    def down(self) -> str | None:
        if self.lost is None and not self.process.is_alive():
            return f"the engine process exited ({_exit_text(self.process.exitcode)})"
        return self.lost

    async def refresh_metrics(self) -> None:
        """Ask the engine for its figures; keep the last ones if it is gone or slow."""
        if self.lost is not None or self.stopping:
            return
        waiter = asyncio.get_running_loop().create_future()
        self.metrics_waiters.append(waiter)
        if len(self.metrics_waiters) == 1:  # one request answers every /metrics waiting
            try:
                self._send(MetricsRequest())
            except OSError:
                return
        try:
            await asyncio.wait_for(waiter, METRICS_WAIT_S)
        except asyncio.TimeoutError:
            pass

    def stop(self) -> None:
        """Ask the engine to end (its live requests get a shutting-down error), then wait for it."""
        self.stopping = True
        try:
            self._send(Shutdown())
        except OSError:
            pass
        self._end_process(STOP_WAIT_S)
        if self.reader.is_alive():
            self.reader.join(timeout=5)

    def _send(self, message: Any) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _on_message(self, message: Any) -> None:
        if isinstance(message, StepEvents):
            self._dispatch(message.events)
        elif isinstance(message, MetricsReply):
            self.metrics.families = message.families
            self._wake_metrics_waiters()

    def _dispatch(self, wire: list[tuple[int, str, Any]]) -> None:
        events: list[Event] = []
        for key, kind, value in wire:
            sequence = self.pending.get(key)
            if sequence is None:
                continue
            if kind != "token":
                del self.pending[key]
                del self.key_of[id(sequence)]
            events.append((sequence, kind, value))
        deliver_events(events)

    def _on_lost(self, _: None) -> None:
        """The engine process ended: fail what it held, and every later request."""
        self.process.join(timeout=1)  # reaped here, on the loop's thread, as everywhere else
        why = f"the engine process exited ({_exit_text(self.process.exitcode)})"
        self.lost = "the server is shutting down" if self.stopping else f"{why}: restart kvpr serve"
        events: list[Event] = [(sequence, "unavailable", self.lost) for sequence in self.pending.values()]
        self.pending.clear()
        self.key_of.clear()
        deliver_events(events)
        self._wake_metrics_waiters()

    def _wake_metrics_waiters(self) -> None:
        waiters, self.metrics_waiters = self.metrics_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- the reader thread -----------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if not self._hop(self._on_message, message):
                return
        connection_wait([self.process.sentinel], timeout=5)  # its exit, without reaping it from this thread
        self._hop(self._on_lost, None)

    def _hop(self, call: Callable[[Any], None], argument: Any) -> bool:
        """Run ``call(argument)`` on the event loop; False once the loop has closed."""
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(call, argument)
        except RuntimeError:
            return False
        return True

    def _end_process(self, wait_s: float) -> None:
        self.process.join(timeout=wait_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _tokenizer(info: EngineInfo) -> Any:
    from kvpr.tokens import load_tokenizer

    return load_tokenizer(Path(info.model_dir)) if info.model_dir is not None else None


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored while a child starts (a spawned interpreter keeps an ignored SIGINT ignored);
    only on the main thread, the one place Python lets a handler change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
