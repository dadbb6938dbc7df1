"""What a server's requests are to its engine: limits, one choice being generated, a queued step."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpr.config import SamplingParams
from kvpr.errors import KvprError

Event = tuple["Sequence", str, Any]  # (sequence, kind, value): ("token", id), ("done", reason), ("error", message)
Deliver = Callable[[list[Event]], None]  # a caller's events of one engine step


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


class EngineUnavailable(Exception):
    """The engine is gone (its process exited): nothing can be served until a restart (HTTP 503)."""


def check_room(config: ServeConfig, in_flight: int, arriving: int) -> None:
    """Raise QueueFull unless ``arriving`` more sequences fit beside the ``in_flight`` ones."""
    if in_flight + arriving > config.max_rows + config.max_waiting:
        raise QueueFull(
            f"the server holds {in_flight} requests ({config.max_rows} rows decoding, "
            f"{config.max_waiting} waiting at most): retry later"
        )


def deliver_events(events: list[Event]) -> None:
    """Hand a step's events to their callers, one call per caller. A cancelled sequence's
    ``("done", "cancelled")`` is dropped: its caller stopped listening."""
    by_caller: dict[int, tuple[Deliver, list[Event]]] = {}
    for event in events:
        sequence, kind, value = event
        if (kind, value) == ("done", "cancelled"):
            continue
        assert sequence.deliver is not None
        by_caller.setdefault(id(sequence.deliver), (sequence.deliver, []))[1].append(event)
    for deliver, caller_events in by_caller.values():
        deliver(caller_events)


@dataclass(eq=False)
class Sequence:
    """One choice being generated: its prompt, sampling, and where it stands."""

    prompt_ids: list[int]
    params: SamplingParams
    tag: Any  # the caller's handle for its events (a choice index; the request key in an engine process)
    deliver: Deliver | None  # None where the engine's outlet routes events itself (an engine process)
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


def request_seed(seed: int | None, choice: int) -> int:
    """Choice ``choice``'s sampling seed: ``seed + choice`` when the client gave one (so a seeded
    request repeats), else fresh randomness."""
    return secrets.randbits(63) if seed is None else (seed + choice) % 2**63
