"""The engine process of ``kvpr serve``: loads the model, sizes the batch, and runs the token loop
on its main thread, alone with its interpreter's GIL but for one thread blocked on the pipe.

Started by ``engine_process.ProcessEngine`` with the ``spawn`` context. A receiver thread takes
submits, cancels and metrics requests from the pipe; the loop sends each pass's events in one
``StepEvents``. Ctrl-C is ignored here: the HTTP process stops the engine (``Shutdown``), and an
engine whose HTTP process vanished (the pipe's end) stops by itself.
"""

from __future__ import annotations

import logging
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

from kvpr.errors import KvprError
from kvpr.serve.batcher import Batcher
from kvpr.serve.engine import EngineInfo
from kvpr.serve.metrics import EngineMetrics
from kvpr.serve.requests import Event, QueueFull, Sequence
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
)

log = logging.getLogger("kvpr.serve")


def engine_main(conn: Connection, spec: EngineSpec) -> None:
    """The process's target: ``Ready`` (or ``StartFailed``) on the pipe, then the loop until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the HTTP process's to handle; it stops us
    try:
        batcher = _start(spec)
    except KvprError as err:
        conn.send(StartFailed(str(err).splitlines()[0], user_error=True))
        return
    except Exception as err:
        traceback.print_exc()
        conn.send(StartFailed(f"the engine failed to start: {err!r}", user_error=False))
        return
    EngineLoop(conn, batcher).run(Ready(EngineInfo.of(batcher, "process")))


def _start(spec: EngineSpec) -> Batcher:
    """The model loaded, the limits resolved against its placement, the batch's cache allocated."""
    from kvpr.serve.cli import load_for_serving

    return Batcher(*load_for_serving(spec), EngineMetrics())


class EngineLoop:
    """The batcher's loop on this thread, its pipe read by another; sends are serialised by a lock."""

    def __init__(self, conn: Connection, batcher: Batcher) -> None:
        self.conn = conn
        self.batcher = batcher
        self.send_lock = threading.Lock()
        self.sequences: dict[int, Sequence] = {}  # key -> sequence not finished yet
        batcher.outlet = self.outlet

    def run(self, ready: Ready) -> None:
        self.send(ready)
        receiver = threading.Thread(target=self.receive, name="kvpr-engine-pipe", daemon=True)
        receiver.start()
        self.batcher.run()
        self.conn.close()

    def send(self, message: Any) -> None:
        try:
            with self.send_lock:
                self.conn.send(message)
        except OSError:  # the HTTP process is gone: stop
            self.batcher.request_stop()

    def outlet(self, events: list[Event]) -> None:
        """A pass's events, as one message keyed by request key."""
        wire = []
        for sequence, kind, value in events:
            if kind != "token":
                self.sequences.pop(sequence.tag, None)
            wire.append((sequence.tag, kind, value))
        self.send(StepEvents(wire))

    def receive(self) -> None:
        """The pipe's messages until ``Shutdown`` or its end."""
        batcher = self.batcher
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):  # the HTTP process is gone
                break
            if isinstance(message, Submit):
                sequences = [Sequence(s.prompt_ids, s.params, s.key, None, s.arrival) for s in message.sequences]
                for sequence in sequences:
                    self.sequences[sequence.tag] = sequence
                try:
                    batcher.submit(sequences)
                except QueueFull as full:  # the HTTP process counts the same: only while stopping
                    for sequence in sequences:
                        self.sequences.pop(sequence.tag, None)
                    self.send(StepEvents([(sequence.tag, "error", str(full)) for sequence in sequences]))
            elif isinstance(message, Cancel):
                known = [self.sequences[key] for key in message.keys if key in self.sequences]
                batcher.cancel(known)
            elif isinstance(message, MetricsRequest):
                assert batcher.metrics is not None
                self.send(MetricsReply(batcher.metrics.snapshot()))
            elif isinstance(message, Shutdown):
                break
        batcher.request_stop()
