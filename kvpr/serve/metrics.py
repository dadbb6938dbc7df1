"""``GET /metrics``: the server's figures in Prometheus' text format, in registries of their own
(never prometheus_client's global one, so several servers in one process stay apart).

The engine's figures (``EngineMetrics``) are recorded where the token loop runs; in an engine
process they reach the HTTP process as a snapshot of their families (``EngineSnapshot``), taken
when ``/metrics`` is read, so the loop pays nothing per step for them.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

if TYPE_CHECKING:
    from kvpr.runtime.row_batch import FixedBatch, RowBatch
    from kvpr.serve.requests import Sequence

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ENGINE_PHASES = (
    "idle",  # no request to serve
    "gather",  # an empty batch waiting for more of an arrival wave
    "start",  # prefilling a new batch at S = 0 (first tokens included)
    "join",  # prefilling requests into free rows of a running batch
    "step",  # queueing decode steps and waiting for their tokens
    "deliver",  # a step's tokens to their requests: bookkeeping, metrics, events
    "other",  # the loop itself: cancellations, queue scans
)


class Collector(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class ServeMetrics:
    """What ``/metrics`` renders: the HTTP side's figures (updated by the handlers) and the
    engine's (``engine``: its registry, or the last snapshot from its process)."""

    def __init__(self, model: str, policy: str, engine: Collector, engine_mode: str, engine_pid: int) -> None:
        self.registry = CollectorRegistry()
        info = Gauge(
            "kvpr_server_info", "the served model and batching policy", ["model", "policy"], registry=self.registry
        )
        info.labels(model, policy).set(1)
        where = Gauge("kvpr_engine_info", "where the token loop runs", ["mode", "pid"], registry=self.registry)
        where.labels(engine_mode, str(engine_pid)).set(1)
        self.requests = Counter(
            "kvpr_requests",
            "HTTP requests answered by endpoint, status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.registry.register(engine)  # type: ignore[arg-type]

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineSnapshot:
    """The engine process's metric families as last read (a prometheus_client collector)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


class EngineMetrics:
    """The token loop's figures; the batcher updates them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        counter = partial(Counter, registry=self.registry)
        gauge = partial(Gauge, registry=self.registry)
        histogram = partial(Histogram, registry=self.registry)
        # requests and tokens
        self.prompt_tokens = counter("kvpr_prompt_tokens", "prompt tokens prefilled")
        self.generation_tokens = counter("kvpr_generation_tokens", "tokens generated")
        self.cancelled = counter("kvpr_requests_cancelled", "choices whose client went away before the end")
        self.ttft = histogram("kvpr_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS)
        self.latency = histogram("kvpr_request_seconds", "arrival to last token", buckets=LATENCY_BUCKETS)
        # the batch
        self.queue_depth = gauge("kvpr_queue_depth", "requests waiting for a row")
        self.running_rows = gauge("kvpr_running_rows", "rows decoding a request")
        self.batch_rows = gauge("kvpr_batch_rows", "rows of the batch, free ones included")
        self.batch_tokens = gauge("kvpr_batch_tokens", "S: token slots of every row in use")
        self.slot_utilisation = gauge("kvpr_slot_utilisation", "share of the rows x S slots holding live tokens")
        self.row_slots = counter("kvpr_row_slots", "rows x S summed over decode steps (what the steps read)")
        self.live_slots = counter("kvpr_live_slots", "live requests' own tokens summed over decode steps")
        self.joins = counter("kvpr_rows_joined", "requests that joined a batch while other rows decoded")
        self.batches = counter("kvpr_batches_started", "batches started from an empty cache")
        # decode steps
        self.step_seconds = histogram("kvpr_decode_step_seconds", "one decode step of the batch", buckets=STEP_BUCKETS)
        self.step_rows = histogram("kvpr_decode_step_live_rows", "live rows per decode step", buckets=ROW_BUCKETS)
        self.tokens_per_second = gauge("kvpr_decode_tokens_per_second", "tokens per second, last 32 decode steps")
        self.recompute_tokens = gauge("kvpr_recompute_tokens", "l: tokens recomputed from X in the last step")
        self.host_tokens = gauge("kvpr_host_tokens", "tokens read from the host tier in the last step")
        self.link_bytes_step = gauge("kvpr_pcie_bytes_per_step", "host link bytes of the last step", ["direction"])
        self.link_bytes = counter("kvpr_pcie_bytes", "host link bytes of all decode steps", ["direction"])
        # the engine loop's wall time, by what it did: where a run's seconds go
        self.engine_seconds = counter("kvpr_engine_seconds", "engine loop wall time by phase", ["phase"])
        self.engine_phases = {phase: self.engine_seconds.labels(phase) for phase in ENGINE_PHASES}
        self.step_times: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)  # (s, live rows)

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())

    def snapshot(self) -> list[Metric]:
        """The families as they stand, to ship to the HTTP process (plain picklable objects)."""
        return list(self.registry.collect())

    def spent(self, phase: str, seconds: float) -> None:
        """Count ``seconds`` of the engine loop's wall time under ``phase`` (one of ENGINE_PHASES)."""
        self.engine_phases[phase].inc(seconds)

    def observe_step(self, batch: RowBatch | FixedBatch, took: float, sequences: list[Sequence]) -> None:
        """A decode step's figures: it took ``took`` seconds and decoded ``sequences``' rows."""
        live_rows = len(sequences)
        self.step_times.append((took, live_rows))
        total_s = sum(t for t, _ in self.step_times)
        self.step_seconds.observe(took)
        self.step_rows.observe(live_rows)
        self.tokens_per_second.set(sum(n for _, n in self.step_times) / total_s if total_s else 0.0)
        recompute_len, host_len = batch.last_split()
        self.recompute_tokens.set(recompute_len)
        self.host_tokens.set(host_len)
        h2d, d2h = batch.link_bytes()
        self.link_bytes_step.labels("h2d").set(h2d)
        self.link_bytes_step.labels("d2h").set(d2h)
        self.link_bytes.labels("h2d").inc(h2d)
        self.link_bytes.labels("d2h").inc(d2h)
        self.batch_rows.set(batch.width)
        self.batch_tokens.set(batch.length)
        owned = sum(len(s.prompt_ids) + s.generated - 1 for s in sequences)  # the tokens the step attended
        self.slot_utilisation.set(owned / (batch.width * batch.length) if batch.length else 0.0)
        self.row_slots.inc(batch.width * batch.length)
        self.live_slots.inc(owned)
