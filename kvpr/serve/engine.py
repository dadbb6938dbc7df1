"""Where the token loop runs, as the HTTP side sees it: ``Engine`` is what the handlers call;
``ThreadEngine`` runs the ``Batcher`` in a thread of this process (the Python API, ``kvpr serve``'s
default, the tests that reach into the batch); ``engine_process.py`` runs it in a process of its own
(``--engine process``), isolated from the HTTP side: its death fails requests, not the server.

Either way a sequence's ``deliver`` is called on the event loop, with its events of one step.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kvpr.serve.batcher import Batcher
from kvpr.serve.metrics import EngineMetrics
from kvpr.serve.requests import EngineUnavailable, Event, Sequence, ServeConfig, deliver_events

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.serve.metrics import Collector


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side learns of a running engine: the model, the limits the placement's memory
    check allowed, and where the loop runs."""

    model_name: str
    vocab_size: int
    model_dir: str | None  # where the tokenizer files are (None: a built-in config, token ids only)
    limits: ServeConfig
    continuous: bool  # requests join running batches
    mode: str  # "process" or "thread"
    pid: int  # the process running the loop

    @classmethod
    def of(cls, batcher: Batcher, mode: str) -> EngineInfo:
        """The info of ``batcher``'s engine, running in this process."""
        llm = batcher.llm
        model_dir = None if llm.model_dir is None else str(llm.model_dir)
        vocab = llm.model_config.vocab_size
        return cls(llm.name, vocab, model_dir, batcher.config, batcher.continuous, mode, os.getpid())


class Engine(Protocol):
    """The engine as the handlers use it; every method is called on the event loop."""

    info: EngineInfo
    tokenizer: Any
    metrics: Collector  # the engine's metric families, as of the last ``refresh_metrics``

    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...

    def stop(self) -> None: ...

    def submit(self, sequences: list[Sequence]) -> None:
        """Queue one request's sequences. Raises QueueFull (429) or EngineUnavailable (503)."""
        ...

    def cancel(self, sequences: list[Sequence]) -> None: ...

    def down(self) -> str | None:
        """Why the engine stopped; None while it runs."""
        ...

    async def refresh_metrics(self) -> None: ...


class ThreadEngine:
    """The ``Batcher`` in a thread of this process, sharing its interpreter with the HTTP side."""

    def __init__(self, llm: LLM, config: ServeConfig) -> None:
        self.metrics = EngineMetrics()
        self.batcher = Batcher(llm, config, self.metrics, self._outlet)  # allocates the cache: fails here
        self.tokenizer = llm.tokenizer
        self.info = EngineInfo.of(self.batcher, "thread")
        self.loop: asyncio.AbstractEventLoop | None = None

    def _outlet(self, events: list[Event]) -> None:  # on the engine thread: one hop per pass
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(deliver_events, events)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    def submit(self, sequences: list[Sequence]) -> None:
        if not self.batcher.thread.is_alive():
            raise EngineUnavailable("the engine thread stopped: restart the server")
        self.batcher.submit(sequences)

    def cancel(self, sequences: list[Sequence]) -> None:
        self.batcher.cancel(sequences)

    def down(self) -> str | None:
        return None if self.batcher.thread.is_alive() else "engine stopped"

    async def refresh_metrics(self) -> None:
        """Nothing to fetch: the figures are this process's own."""
