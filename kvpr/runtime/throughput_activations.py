"""Throughput mode's activations: each lane's residual stream between layers, on its tier.

The placement puts the whole residual stream on the tier holding its 50th percentile
(``Placement.activation_tier``); the block schedule (``throughput``) puts a lane's after each layer
and gets it before the next, and ``load`` queues it ahead with the unit's cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvpr.cache.disk import DiskQueue, DiskTensor
from kvpr.device import host_empty
from kvpr.runtime.streams import StreamSet
from kvpr.runtime.throughput_lanes import flat_view
from kvpr.throughput_config import Tier


class Activations:
    """The residual stream of each lane between layers, kept on the activation tier.

    GPU: held as is. CPU: written to a pinned buffer on the store stream after the layer, and
    loaded back on the copy stream with the unit's cache (``load``), so neither direction holds up
    the compute stream behind a large copy. Disk: the same buffer, written to a file by the disk
    thread and read back by the host before the load is queued.
    """

    def __init__(self, tier: Tier, device: torch.device, directory: Path | None, queue: DiskQueue, pin: bool) -> None:
        self.tier, self.device, self.directory, self.queue, self.pin = tier, device, directory, queue, pin
        self._held: dict[int, torch.Tensor] = {}  # lane -> on the device (GPU tier, or loaded)
        self._ready: dict[int, object] = {}  # lane -> event of its load
        self._host: dict[int, torch.Tensor] = {}  # lane -> flat pinned buffer
        self._stored: dict[int, object] = {}  # lane -> event of a put not yet loaded back
        self._shape: dict[int, tuple[int, ...]] = {}
        self._files: dict[int, DiskTensor] = {}

    def put(self, lane: int, hidden: torch.Tensor, streams: StreamSet) -> None:
        """Keep ``hidden`` [b, q, h] (on the compute device) until the lane's next layer."""
        if self.tier is Tier.GPU:
            self._held[lane] = hidden
            return
        host = self._host.get(lane)
        if host is None or host.numel() < hidden.numel():  # sized by the prefill, the largest put
            host = self._host[lane] = host_empty((hidden.numel(),), hidden.dtype, self.pin)
        self._shape[lane] = tuple(hidden.shape)
        staged = flat_view(host, self._shape[lane])
        stored = streams.event()
        with streams.on_store_after_compute():
            streams.keep_alive_for_store(hidden)
            staged.copy_(hidden, non_blocking=True)
            streams.record_on_store(stored)
        self._stored[lane] = stored
        if self.tier is Tier.DISK:
            if lane not in self._files or self._files[lane].shape[1] < hidden.numel():
                assert self.directory is not None
                self._files[lane] = DiskTensor(self.directory / f"act-{lane}.bin", (1, hidden.numel()), hidden.dtype)
            file = self._files[lane]

            def write() -> None:
                if stored is not None:
                    stored.synchronize()  # type: ignore[attr-defined]
                file.write(0, 0, staged.reshape(1, -1))

            self.queue.submit(("act", lane), write)

    def load(self, lane: int, streams: StreamSet) -> None:
        """Queue the lane's residual stream back to the device on the copy stream (CPU, disk)."""
        if self.tier is Tier.GPU or lane not in self._stored:
            return  # on the device already, or queued (the lane's next put has not happened yet)
        staged = flat_view(self._host[lane], self._shape[lane])
        if self.tier is Tier.DISK:  # the host reads the file now, while the device runs
            self.queue.wait(("act", lane))
            self._files[lane].read_into(0, 0, staged.reshape(1, -1))
        loaded = torch.empty(self._shape[lane], dtype=staged.dtype, device=self.device)
        ready = streams.event()
        streams.copy_waits(self._stored.pop(lane))  # type: ignore[arg-type]
        with streams.on_copy():
            loaded.copy_(staged, non_blocking=True)
            streams.record_on_copy(ready)  # type: ignore[arg-type]
        self._held[lane], self._ready[lane] = loaded, ready

    def get(self, lane: int, streams: StreamSet) -> torch.Tensor:
        """The lane's residual stream [b, q, h] on the compute device."""
        self.load(lane, streams)
        if self.tier is not Tier.GPU:
            streams.compute_waits(self._ready.pop(lane))  # type: ignore[arg-type]
        return self._held.pop(lane)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
