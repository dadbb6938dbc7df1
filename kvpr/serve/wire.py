"""The messages between the HTTP process and the engine process (pickled over one pipe).

In: ``Submit``, ``Cancel``, ``MetricsRequest``, ``Shutdown``. Out: ``Ready`` or ``StartFailed``
once, then ``StepEvents`` (one per engine step, every row's events together) and ``MetricsReply``.
A sequence is named by its request key, an int the HTTP process gives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from kvpr.config import EngineConfig, SamplingParams

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kvpr.serve.engine import EngineInfo


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process is started with: the engine flags and the serve limits to resolve
    against the placement's memory check (``serve.cli.resolve_limits``)."""

    config: EngineConfig
    rows: str  # --max-num-seqs: a count or "auto"
    max_model_len: int | None
    max_waiting: int | None
    batch_wait_ms: float


class Submitted(NamedTuple):
    """One sequence of a request, as the engine needs it."""

    key: int
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # perf_counter in the HTTP process (a system-wide monotonic clock)


@dataclass(frozen=True)
class Submit:
    sequences: list[Submitted]  # one request's, all or none


@dataclass(frozen=True)
class Cancel:
    keys: list[int]


@dataclass(frozen=True)
class MetricsRequest:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    info: EngineInfo


@dataclass(frozen=True)
class StartFailed:
    message: str  # one line
    user_error: bool  # a KvprError: the CLI prints it and exits 2


@dataclass(frozen=True)
class StepEvents:
    events: list[tuple[int, str, Any]]  # (key, kind, value), as ``requests.Event``


@dataclass(frozen=True)
class MetricsReply:
    families: list[Metric]
