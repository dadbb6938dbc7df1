"""Throughput mode: FlexGen's block schedule with partial KV recomputation.

A block of ``B`` sequences is cut into GPU batches ("lanes") of at most ``gpu_batch_size`` rows.
Every step (prefill or one decode token) runs the zig-zag order: for each layer, every lane, so a
layer's streamed weights (:class:`~kvpr.runtime.weights.LayerWeights`) are loaded once per block::

    copy stream    | W[i+1] | cache(i, 1) | cache(i, 2) | ... | cache(i+1, 0) | W[i+2] ...
    compute stream | layer i lane 0 | layer i lane 1 | ...    (each waits for its cache and W[i])
    store stream   |   new K,V,X of (i, 0) | (i, 1) | ...   (after their compute)
    disk thread    | writes of disk-tier tokens, in order; reads run on the host before a load

Each lane's cache is split by token slots, the oldest first (``Placement`` docstring)::

    [0, g)          GPU tier: attended in place (copied into the staging buffer on the device)
    [g, g + c)      CPU tier (pinned): the first l of the cached ones recomputed from X (copied in
                    chunks, each recomputed as it lands), K,V of the rest copied
    [g + c, s_max)  disk tier: read into pinned staging by the host, then copied

``l = round(F * c_s)`` of the ``c_s`` cached CPU-tier tokens, with ``F`` fixed (``--recompute F``) or
chosen each step by the throughput cost model (``auto``: ``recompute_fraction_policy``).
Activations (the residual stream between layers) live on the tier holding the placement's 50th
percentile. Embeddings, final norm and LM head run on the GPU for the whole block at once.

On a CPU-only machine the streams are no-ops and copies run inline, so every placement (disk in a
temporary directory) is tested against the latency-mode executors without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvpr.cache.disk import DiskQueue, DiskTensor
from kvpr.cache.storage import CacheShape, KVStorage
from kvpr.config import CacheSplit, Tier
from kvpr.device import host_empty
from kvpr.models.common import attend
from kvpr.runtime.batch import BatchState
from kvpr.runtime.latency import chunk_bounds
from kvpr.runtime.streams import StreamSet
from kvpr.scheduler.policy import round_fraction

if TYPE_CHECKING:
    from kvpr.config import ModelConfig, ThroughputConfig
    from kvpr.models.base import DecoderModel
    from kvpr.runtime.weights import LayerWeights

Rope = tuple[torch.Tensor, torch.Tensor] | None


def _view(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` at the start of a flat buffer (one buffer serves lanes of
    any size, and token ranges stay contiguous)."""
    numel = 1
    for size in shape:
        numel *= size
    return flat[:numel].view(shape)


class _Staging:
    """One of two device staging slots for a (layer, lane) unit, with the events ordering it."""

    def __init__(
        self,
        shape: CacheShape,
        split: CacheSplit,
        device: torch.device,
        streams: StreamSet,
        num_chunks: int,
        with_x: bool,
    ) -> None:
        kv = shape.max_len * shape.batch_size * shape.num_kv_heads * shape.head_dim
        self.k = torch.empty(kv, dtype=shape.dtype, device=device)  # flat; [s_max, b, n_kv, d] per lane
        self.v = torch.empty(kv, dtype=shape.dtype, device=device)
        x_numel = split.cpu * shape.batch_size * shape.hidden_size if with_x else 0
        self.x = torch.empty(x_numel, dtype=shape.dtype, device=device)  # [c, b, h] per lane
        disk_kv = split.disk * shape.batch_size * shape.num_kv_heads * shape.head_dim
        pin = streams.enabled
        self.disk_k = host_empty((disk_kv,), shape.dtype, pin)  # pinned landing area of disk reads
        self.disk_v = host_empty((disk_kv,), shape.dtype, pin)
        self.x_ready = [streams.event() for _ in range(num_chunks)]
        self.kv_ready = streams.event()
        self.free = streams.event()  # the unit that used this slot has finished its attention
        self.disk_copied = streams.event()  # disk_k/v copied to the device: may be refilled
        self.chunks: list[tuple[int, int]] = []  # X chunks (offsets in the CPU tier) of the queued load


class _Activations:
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
        staged = _view(host, self._shape[lane])
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
        staged = _view(self._host[lane], self._shape[lane])
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


class _Lane:
    """One GPU batch of the block: its rows, batch state and the three tiers of its cache."""

    def __init__(
        self,
        rows: slice,
        cfg: "ModelConfig",
        split: CacheSplit,
        device: torch.device,
        dtype: torch.dtype,
        pin: bool,
        store_inputs: bool,
        directory: Path | None,
    ) -> None:
        self.rows = rows
        b = rows.stop - rows.start
        self.batch = BatchState(b, split.max_len, device)
        kv_shape = (cfg.num_layers, split.gpu, b, cfg.num_kv_heads, cfg.head_dim)
        self.gpu_k = torch.empty(kv_shape, dtype=dtype, device=device) if split.gpu else None  # [L, g, b, n_kv, d]
        self.gpu_v = torch.empty(kv_shape, dtype=dtype, device=device) if split.gpu else None
        host_shape = CacheShape.for_model(cfg, b, split.cpu, dtype)
        self.host = KVStorage(host_shape, torch.device("cpu"), pin, store_inputs) if split.cpu else None
        disk_shape = (cfg.num_layers, split.disk, b, cfg.num_kv_heads, cfg.head_dim)
        if split.disk:
            assert directory is not None
            self.disk_k = DiskTensor(directory / f"lane{rows.start}-k.bin", disk_shape, dtype)
            self.disk_v = DiskTensor(directory / f"lane{rows.start}-v.bin", disk_shape, dtype)
            # Pinned landing area of each layer's new-token K and V on their way to disk.
            self.token_out = host_empty((cfg.num_layers, 2, b, cfg.num_kv_heads, cfg.head_dim), dtype, pin)
        self.rope_new: Rope = None
        self.rope_old: Rope = None
        self.mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start

    def close(self) -> None:
        """Remove the lane's disk files (the other tiers are freed with the lane)."""
        for file in (getattr(self, "disk_k", None), getattr(self, "disk_v", None)):
            if file is not None:
                file.close()


class ThroughputExecutor:
    """Runs one block (at most ``num_gpu_batches * gpu_batch_size`` rows) with the block schedule.

    Presents the executor interface the token loop drives (``prefill``, ``decode``, ``finish``,
    ``recompute_lens``), so generation, scoring and sampling are shared with latency mode.
    """

    def __init__(
        self,
        model: "DecoderModel",
        weights: "LayerWeights",
        config: "ThroughputConfig",
        batch_size: int,
        max_len: int,
        device: torch.device,
        dtype: torch.dtype,
        recompute_fraction: Callable[[int], float],
        store_inputs: bool,
        num_chunks: int,
        directory: Path | None,
    ) -> None:
        if batch_size > config.block_size:
            raise ValueError(f"{batch_size} rows exceed the block of {config.block_size}")
        self.model, self.weights, self.device, self.dtype = model, weights, device, dtype
        self.layers = model.decoder_layers
        self.recompute_fraction = recompute_fraction
        self.num_chunks = num_chunks
        self.streams = StreamSet(device, separate_store=True)
        weights.start(self.streams)
        placement = config.placement
        self.split = placement.cache_split(max_len)
        self.store_inputs = store_inputs and self.split.cpu > 0
        pin = self.streams.enabled
        gbs = config.gpu_batch_size
        cfg = model.config
        self.lanes = [
            _Lane(
                slice(start, min(start + gbs, batch_size)),
                cfg,
                self.split,
                device,
                dtype,
                pin,
                self.store_inputs,
                directory,
            )
            for start in range(0, batch_size, gbs)
        ]
        widest = CacheShape.for_model(cfg, max(lane.size for lane in self.lanes), max_len, dtype)
        self.staging = [
            _Staging(widest, self.split, device, self.streams, num_chunks, self.store_inputs) for _ in range(2)
        ]
        self.disk_queue = DiskQueue()
        self.acts = _Activations(placement.activation_tier, device, directory, self.disk_queue, pin)
        self.length = 0
        self.recompute_len = 0
        self.recompute_lens: list[int] = []
        self._turn = 0  # staging slot of the next queued load

    # -- the token loop's interface ---------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """The prompt [B, q] (``valid`` marks real tokens) -> logits [B, q or 1, V]."""
        assert self.length == 0 and input_ids.shape == valid.shape
        self.length = input_ids.shape[1]
        for index, lane in enumerate(self.lanes):
            positions, lane.mask = lane.batch.append(valid[lane.rows])
            lane.rope_new = self.model.rope(positions, self.dtype)  # [b, q, 1, d]
            self.acts.put(index, self.model.embed(input_ids[lane.rows], positions), self.streams)
        self._run_layers(self._prefill_unit, loads=False)
        return self._logits(all_logits)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row, token_ids [B] -> logits [B, V]."""
        context_len = self.length
        if context_len >= self.split.max_len:
            raise ValueError(f"cache holds {self.split.max_len} slots; all are used")
        self.length += 1
        _on_gpu, on_cpu, _on_disk = self.split.ranges(context_len)
        fraction = self.recompute_fraction(context_len) if self.store_inputs and on_cpu else 0.0
        self.recompute_len = round_fraction(fraction, on_cpu)  # the oldest of the CPU tier's tokens
        assert 0 <= self.recompute_len <= on_cpu
        self.recompute_lens.append(self.recompute_len)
        first_cpu = self.split.gpu
        for index, lane in enumerate(self.lanes):
            rows = token_ids[lane.rows]
            positions, lane.mask = lane.batch.append(torch.ones_like(rows, dtype=torch.bool).unsqueeze(1))
            lane.rope_new = self.model.rope(positions, self.dtype)  # [b, 1, 1, d]
            old = lane.batch.positions[:, first_cpu : first_cpu + self.recompute_len].transpose(0, 1)  # [l, b]
            lane.rope_old = self.model.rope(old, self.dtype) if self.recompute_len else None  # [l, b, 1, d]
            self.acts.put(index, self.model.embed(rows.unsqueeze(1), positions), self.streams)
        self._run_layers(self._decode_unit, loads=True)
        return self._logits(False)[:, -1]

    def finish(self) -> None:
        """Wait for every copy, store and disk write (the cache and buffers may then be freed)."""
        self.streams.synchronize()
        self.disk_queue.drain()

    def close(self) -> None:
        self.finish()
        self.disk_queue.close()
        self.acts.close()
        for lane in self.lanes:
            lane.close()

    # -- the block schedule -------------------------------------------------------------------------

    def _run_layers(self, compute, loads: bool) -> None:  # type: ignore[no-untyped-def]
        """Zig-zag over (layer, lane) units; the next unit's cache load and the next layer's weights
        are queued before this unit's compute, so they stream in while it runs."""
        units = [(layer, lane) for layer in range(len(self.layers)) for lane in range(len(self.lanes))]
        slots = {}

        def queue_loads(layer: int, lane: int) -> None:
            self.acts.load(lane, self.streams)  # the residual stream first: compute needs it first
            if loads:
                slots[layer, lane] = self._issue_loads(layer, lane)

        queue_loads(*units[0])
        for position, (layer, lane) in enumerate(units):
            if lane == 0:
                self.weights.activate(layer)
            if position + 1 < len(units):
                queue_loads(*units[position + 1])
            if lane == 0:  # behind the next unit's cache on the copy stream
                self.weights.prefetch((layer + 1) % len(self.layers))
            compute(layer, lane, slots.pop((layer, lane), None))
            if lane == len(self.lanes) - 1:
                self.weights.release(layer)

    def _prefill_unit(self, layer_index: int, lane_index: int, _slot: _Staging | None) -> None:
        layer, lane = self.layers[layer_index], self.lanes[lane_index]
        hidden = self.acts.get(lane_index, self.streams)  # [b, q, h]
        x = layer.attn_input(hidden)
        k, v = layer.kv_from_input(x, lane.rope_new)  # [b, q, n_kv, d]
        out = attend(layer.query(x, lane.rope_new), k.transpose(1, 2), v.transpose(1, 2), lane.mask)  # type: ignore[arg-type]
        self._store(layer_index, lane, 0, k.transpose(0, 1), v.transpose(0, 1), x.transpose(0, 1))
        self.acts.put(lane_index, layer.finish(hidden, out), self.streams)

    def _issue_loads(self, layer: int, lane_index: int) -> _Staging | None:
        """Queue the loads of one unit (X chunks, CPU-tier K,V, disk-tier K,V); None: nothing to load."""
        lane = self.lanes[lane_index]
        context_len = self.length - 1
        on_gpu, on_cpu, on_disk = self.split.ranges(context_len)
        if context_len < self.split.gpu:  # the unit attends over the GPU tier in place
            return None
        slot = self.staging[self._turn]
        self._turn ^= 1
        b, g, c, recompute_len = lane.size, self.split.gpu, self.split.cpu, self.recompute_len
        keys, values = self._kv_views(slot, lane)
        if on_disk:  # the host reads the file now, while the device runs what is queued
            self.disk_queue.wait(("kv", layer, lane_index))
            if slot.disk_copied is not None:
                slot.disk_copied.synchronize()  # the last copy out of this landing area finished
            tail = (on_disk, b, *keys.shape[2:])
            disk_k, disk_v = _view(slot.disk_k, tail), _view(slot.disk_v, tail)
            lane.disk_k.read_into(layer, 0, disk_k)
            lane.disk_v.read_into(layer, 0, disk_v)
        self.streams.copy_waits(slot.free)  # the unit two back has finished with this slot
        slot.chunks = chunk_bounds(recompute_len, self.num_chunks)
        with self.streams.on_copy():
            if recompute_len:
                x_view = _view(slot.x, (c, b, self.model.config.hidden_size))
                for (start, end), ready in zip(slot.chunks, slot.x_ready):
                    x_view[start:end].copy_(lane.host.x(layer)[start:end], non_blocking=True)  # type: ignore[union-attr]
                    self.streams.record_on_copy(ready)
            if on_cpu > recompute_len:
                copied = slice(g + recompute_len, g + on_cpu)
                keys[copied].copy_(lane.host.k(layer)[recompute_len:on_cpu], non_blocking=True)  # type: ignore[union-attr]
                values[copied].copy_(lane.host.v(layer)[recompute_len:on_cpu], non_blocking=True)  # type: ignore[union-attr]
            if on_disk:
                keys[g + c : g + c + on_disk].copy_(disk_k, non_blocking=True)
                values[g + c : g + c + on_disk].copy_(disk_v, non_blocking=True)
                self.streams.record_on_copy(slot.disk_copied)
            self.streams.record_on_copy(slot.kv_ready)
        return slot

    def _kv_views(self, slot: _Staging, lane: _Lane) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        shape = (self.split.max_len, lane.size, cfg.num_kv_heads, cfg.head_dim)
        return _view(slot.k, shape), _view(slot.v, shape)  # [s_max, b, n_kv, d]

    def _decode_unit(self, layer_index: int, lane_index: int, slot: _Staging | None) -> None:
        layer, lane = self.layers[layer_index], self.lanes[lane_index]
        context_len = self.length - 1  # the new token's slot
        on_gpu, _on_cpu, _on_disk = self.split.ranges(context_len)
        hidden = self.acts.get(lane_index, self.streams)  # [b, 1, h]
        x_new = layer.attn_input(hidden)
        q = layer.query(x_new, lane.rope_new)  # [b, n_q, 1, d]
        k_new, v_new = layer.kv_from_input(x_new, lane.rope_new)  # [b, 1, n_kv, d]
        if context_len < self.split.gpu:  # everything, the new slot too, is in the GPU tier
            keys, values = lane.gpu_k[layer_index], lane.gpu_v[layer_index]  # type: ignore[index]
        else:
            assert slot is not None  # _issue_loads gives every unit past the GPU tier a slot
            keys, values = self._kv_views(slot, lane)
            if on_gpu:  # device-to-device, on the compute stream
                keys[:on_gpu] = lane.gpu_k[layer_index][:on_gpu]  # type: ignore[index]
                values[:on_gpu] = lane.gpu_v[layer_index][:on_gpu]  # type: ignore[index]
            self._recompute(layer_index, lane, slot, keys, values)
            self.streams.compute_waits(slot.kv_ready)  # copied K,V have landed
        keys[context_len] = k_new[:, 0]
        values[context_len] = v_new[:, 0]
        span = slice(0, context_len + 1)
        out = attend(q, keys[span].permute(1, 2, 0, 3), values[span].permute(1, 2, 0, 3), lane.mask)  # type: ignore[arg-type]
        if slot is not None:
            self.streams.record_on_compute(slot.free)
        if context_len >= self.split.gpu:  # written above when the GPU tier is the attention buffer
            self._store(
                layer_index, lane, context_len, k_new.transpose(0, 1), v_new.transpose(0, 1), x_new.transpose(0, 1)
            )
        self.acts.put(lane_index, layer.finish(hidden, out), self.streams)

    def _recompute(
        self, layer_index: int, lane: _Lane, slot: _Staging, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """K,V of the first ``l`` CPU-tier tokens from their X, each chunk as soon as it lands."""
        if not self.recompute_len:
            return
        g = self.split.gpu
        layer = self.layers[layer_index]
        x_view = _view(slot.x, (self.split.cpu, lane.size, self.model.config.hidden_size))
        for (start, end), ready in zip(slot.chunks, slot.x_ready):
            self.streams.compute_waits(ready)
            rope = None if lane.rope_old is None else (lane.rope_old[0][start:end], lane.rope_old[1][start:end])
            layer.kv_into(x_view[start:end], rope, keys[g + start : g + end], values[g + start : g + end])

    def _store(self, layer: int, lane: _Lane, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Write slots [start, start + t) of one layer to their tiers: k, v [t, b, n_kv, d], x [t, b, h]."""
        end = start + k.shape[0]
        g, c = self.split.gpu, self.split.cpu
        if start < g:  # GPU tier, on the compute stream
            stop = min(end, g)
            lane.gpu_k[layer][start:stop] = k[: stop - start]  # type: ignore[index]
            lane.gpu_v[layer][start:stop] = v[: stop - start]  # type: ignore[index]
        lo, hi = max(start, g), min(end, g + c)
        if lo < hi:  # CPU tier: device-to-host on the store stream, after the compute
            tensors = [(lane.host.k(layer), k), (lane.host.v(layer), v)]  # type: ignore[union-attr]
            if self.store_inputs:
                tensors.append((lane.host.x(layer), x))  # type: ignore[union-attr]
            with self.streams.on_store_after_compute():
                for host, source in tensors:
                    part = source[lo - start : hi - start].contiguous()
                    self.streams.keep_alive_for_store(part)
                    host[lo - g : hi - g].copy_(part, non_blocking=True)
        lo = max(start, g + c)
        if lo < end:  # disk tier: to pinned memory on the store stream, then the disk thread writes
            self._store_disk(layer, lane, lo - g - c, k[lo - start :], v[lo - start :])

    def _store_disk(self, layer: int, lane: _Lane, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        key = ("kv", layer, self.lanes.index(lane))
        if k.shape[0] == 1:  # a decode token: through the lane's pinned landing area for this layer
            self.disk_queue.wait(key)  # its previous write has left the landing area
            out_k, out_v = lane.token_out[layer, 0:1], lane.token_out[layer, 1:2]
            with self.streams.on_store_after_compute():
                out_k.copy_(k, non_blocking=True)
                out_v.copy_(v, non_blocking=True)
                done = self.streams.event()
                self.streams.record_on_store(done)
        else:  # the prompt: a blocking copy (once per run)
            out_k, out_v, done = k.to("cpu").contiguous(), v.to("cpu").contiguous(), None

        def write() -> None:
            if done is not None:
                done.synchronize()
            lane.disk_k.write(layer, offset, out_k)
            lane.disk_v.write(layer, offset, out_v)

        self.disk_queue.submit(key, write)

    def _logits(self, all_logits: bool) -> torch.Tensor:
        outputs = []
        for index in range(len(self.lanes)):
            hidden = self.acts.get(index, self.streams)
            outputs.append(self.model.logits(hidden if all_logits else hidden[:, -1:]))
        return torch.cat(outputs)
