"""The only file that creates CUDA streams and events.

On a CPU every operation here is a no-op and copies run inline, so the overlapped executor runs
the same arithmetic everywhere and is testable without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


class StreamSet:
    """A compute stream (the current one), a copy stream for loads, and where write-backs go.

    Latency mode uses one copy stream for both directions: a layer's write-back is issued after
    its compute, and the next load that could conflict (two layers on) must wait for that compute
    anyway. Throughput mode asks for a separate store stream (``separate_store=True``): there the
    next layer's weights are loaded while this layer's batches compute, and a load queued behind a
    store would wait for the store's compute.
    """

    def __init__(self, device: torch.device, separate_store: bool = False) -> None:
        self.enabled = device.type == "cuda"
        self.device = device
        self.compute = torch.cuda.current_stream(device) if self.enabled else None
        self.copy = torch.cuda.Stream(device) if self.enabled else None
        self.store = (torch.cuda.Stream(device) if separate_store else self.copy) if self.enabled else None

    def event(self) -> torch.cuda.Event | None:
        return torch.cuda.Event() if self.enabled else None

    def record_on_copy(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.record(self.copy)

    def record_on_compute(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.record(self.compute)

    def compute_waits(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.compute.wait_event(event)  # type: ignore[union-attr]

    def copy_waits(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            self.copy.wait_event(event)  # type: ignore[union-attr]

    def copy_waits_compute(self) -> None:
        if self.enabled:
            self.copy.wait_stream(self.compute)  # type: ignore[union-attr]

    def compute_waits_copy(self) -> None:
        if self.enabled:
            self.compute.wait_stream(self.copy)  # type: ignore[union-attr]

    @contextmanager
    def compute_on_current(self) -> Iterator[None]:
        """Make the current stream the compute stream while inside: a CUDA graph's capture stream
        (work of a capture must stay on captured streams)."""
        if not self.enabled:
            yield
            return
        saved = self.compute
        self.compute = torch.cuda.current_stream(self.device)
        try:
            yield
        finally:
            self.compute = saved

    def keep_alive_for_copy(self, tensor: torch.Tensor) -> None:
        """Tell the caching allocator ``tensor`` is read by the copy stream (no early reuse)."""
        if self.enabled and tensor.is_cuda:
            tensor.record_stream(self.copy)  # type: ignore[arg-type]

    def on_copy(self) -> AbstractContextManager[object]:
        """Work queued inside runs on the copy stream: torch's stream context itself, not wrapped in
        a generator (entered once per chunk a step loads)."""
        return torch.cuda.stream(self.copy) if self.enabled else nullcontext()

    @contextmanager
    def on_store_after_compute(self) -> Iterator[None]:
        """Run device-to-host write-backs on the store stream, after the compute queued so far."""
        if not self.enabled:
            yield
            return
        self.store.wait_stream(self.compute)  # type: ignore[union-attr]
        with torch.cuda.stream(self.store):
            yield

    def keep_alive_for_store(self, tensor: torch.Tensor) -> None:
        """Tell the caching allocator ``tensor`` is read by the store stream (no early reuse)."""
        if self.enabled and tensor.is_cuda:
            tensor.record_stream(self.store)  # type: ignore[arg-type]

    def record_on_store(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            event.record(self.store)

    def synchronize(self) -> None:
        if self.enabled:
            torch.cuda.synchronize(self.device)


class StoreMark:
    """The last write-back to some host slots (an event on the store stream), and whether the copy
    and compute streams have waited for it since it was recorded. A stream's later work stays
    ordered after one wait, and the event is recorded again only when slots are written (a tail
    flushed, a join's rows), so each stream waits once per record rather than once per chunk or
    layer: on CUDA every wait is a host call on the decode step's critical path."""

    def __init__(self, streams: StreamSet) -> None:
        self.streams = streams
        self.event = streams.event()
        self.copy_waited = self.compute_waited = True  # nothing written yet: nothing to wait for

    def record(self) -> None:
        """Mark the store stream's work queued so far (inside ``on_store_after_compute``)."""
        self.streams.record_on_store(self.event)
        self.copy_waited = self.compute_waited = self.event is None  # no events (CPU): never a wait

    def settle(self) -> None:
        """The compute stream waits for the write-back now, and so does everything queued after it
        on any stream forked from compute (a replayed step's loads): no wait is left to issue."""
        self.compute_waits()
        self.copy_waited = True

    def copy_waits(self) -> None:
        """Loads queued after this read the slots as written."""
        if not self.copy_waited:
            self.streams.copy_waits(self.event)
            self.copy_waited = True

    def compute_waits(self) -> None:
        """Compute queued after this may overwrite what the write-back read (the GPU tail)."""
        if not self.compute_waited:
            self.streams.compute_waits(self.event)
            self.compute_waited = True


class TokenMailbox:
    """Sampled token ids copied to host memory without blocking the stream.

    The copy and an event are queued right after sampling, so the next decode step can be queued
    behind them before the host waits: the host then waits for this step's tokens only, while the
    device already runs the next step (no idle gap between steps). Two slots alternate.
    """

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.slots = [torch.empty(batch_size, dtype=torch.long, pin_memory=self.enabled) for _ in range(2)]
        self.events = [torch.cuda.Event() if self.enabled else None for _ in range(2)]
        self.turn = 0

    def post(self, token_ids: torch.Tensor) -> int:
        """Queue the copy of token_ids [b]; returns the slot to ``read`` later."""
        slot, self.turn = self.turn, self.turn ^ 1
        self.slots[slot].copy_(token_ids, non_blocking=True)  # after the sampling kernels, in stream order
        event = self.events[slot]
        if event is not None:
            event.record()  # completes when the copy has landed
        return slot

    def read(self, slot: int) -> list[int]:
        """Wait for one posted copy (not for work queued after it) and return the ids."""
        event = self.events[slot]
        if event is not None:
            event.synchronize()
        return self.slots[slot].tolist()
