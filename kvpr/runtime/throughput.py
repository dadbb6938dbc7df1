"""Throughput mode: FlexGen's block schedule with partial KV recomputation.

A block of ``B`` sequences is cut into GPU batches ("lanes") of at most ``gpu_batch_size`` rows.
Every step (prefill or one decode token) runs the zig-zag order: for each layer, every lane, so a
layer's streamed weights (:class:`~kvpr.runtime.weights.LayerWeights`) are loaded once per block::

    copy stream    | W[i+1] | cache(i, 1) | cache(i, 2) | ... | cache(i+1, 0) | W[i+2] ...
    compute stream | layer i lane 0 | layer i lane 1 | ...    (each waits for its cache and W[i])
    store stream   |   new K,V,X of (i, 0) | (i, 1) | ...   (after their compute)
    disk thread    | writes of disk-tier tokens, in order; reads run on the host before a load

Each lane's cache is split by token slots, the oldest first (``Placement`` docstring; the buffers are
``throughput_lanes``'s)::

    [0, g)          GPU tier: attended in place (copied into the staging buffer on the device)
    [g, g + c)      CPU tier (pinned): the first l of the cached ones recomputed from X (copied in
                    chunks, each recomputed as it lands), K,V of the rest copied
    [g + c, s_max)  disk tier: read into pinned staging by the host, then copied

With a K,V codec (``--kv-codec int8|int4``) the CPU and disk tiers store the codec's parts: the new
tokens are encoded on the compute stream before their write-back, and a unit's parts land in a
device staging area and are decoded on the compute stream, after landing, into the K,V staging
buffer (the GPU tier stays as computed). With an X codec (``--x-codec``) stored X is encoded the
same way and each X chunk decoded just before its K,V are recomputed.

``l = round(F * c_s)`` of the ``c_s`` cached CPU-tier tokens, with ``F`` fixed (``--recompute F``) or
chosen each step by the throughput cost model (``auto``: ``recompute_fraction_policy``).
Activations (the residual stream between layers, ``throughput_activations``) live on the tier holding
the placement's 50th percentile. Embeddings, final norm and LM head run on the GPU for the whole block at once.

On a CPU-only machine the streams are no-ops and copies run inline, so every placement (disk in a
temporary directory) is tested against the latency-mode executors without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvpr.cache.codec import EncodedKV
from kvpr.cache.disk import DiskQueue
from kvpr.cache.storage import CacheShape
from kvpr.models.common import attend
from kvpr.runtime.latency import chunk_bounds
from kvpr.runtime.streams import StreamSet
from kvpr.runtime.throughput_activations import Activations
from kvpr.runtime.throughput_lanes import Lane, Staging, flat_view, part_layouts, part_views
from kvpr.scheduler.policy import round_fraction

if TYPE_CHECKING:
    from kvpr.cache.codec import KVCodec, XCodec
    from kvpr.models.base import DecoderModel
    from kvpr.runtime.weights import LayerWeights
    from kvpr.throughput_config import ThroughputConfig


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
        codec: "KVCodec | None" = None,
        x_codec: "XCodec | None" = None,
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
        self.codec, self.x_codec = codec, x_codec
        self.kv_parts, self.x_parts = part_layouts(model.config, dtype, codec, x_codec)
        pin = self.streams.enabled
        gbs = config.gpu_batch_size
        cfg = model.config
        self.lanes = [
            Lane(
                slice(start, min(start + gbs, batch_size)),
                cfg,
                self.split,
                device,
                dtype,
                pin,
                self.store_inputs,
                directory,
                codec,
                x_codec,
            )
            for start in range(0, batch_size, gbs)
        ]
        widest = CacheShape.for_model(cfg, max(lane.size for lane in self.lanes), max_len, dtype)
        self.staging = [
            Staging(
                widest,
                self.split,
                device,
                self.streams,
                num_chunks,
                self.store_inputs,
                self.kv_parts,
                self.x_parts,
                codec is not None,
            )  # fmt: skip
            for _ in range(2)
        ]
        self.disk_queue = DiskQueue()
        self.acts = Activations(placement.activation_tier, device, directory, self.disk_queue, pin)
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
        """The run is over: its disk tier's cache and activation files go now, not with the executor."""
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

    def _prefill_unit(self, layer_index: int, lane_index: int, _slot: Staging | None) -> None:
        layer, lane = self.layers[layer_index], self.lanes[lane_index]
        hidden = self.acts.get(lane_index, self.streams)  # [b, q, h]
        x = layer.attn_input(hidden)
        k, v = layer.kv_from_input(x, lane.rope_new)  # [b, q, n_kv, d]
        out = attend(layer.query(x, lane.rope_new), k.transpose(1, 2), v.transpose(1, 2), lane.mask)  # type: ignore[arg-type]
        self._store(layer_index, lane, 0, k.transpose(0, 1), v.transpose(0, 1), x.transpose(0, 1))
        self.acts.put(lane_index, layer.finish(hidden, out), self.streams)

    def _issue_loads(self, layer: int, lane_index: int) -> Staging | None:
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
        # Where copied K,V land: the K,V staging itself at slot offset g, or a codec's parts at offset 0.
        if self.codec is None:
            targets, base = {"k": keys, "v": values}, g
        else:
            targets, base = part_views(slot.enc, self.kv_parts, (c + self.split.disk, b)), 0
        if on_disk:  # the host reads the file now, while the device runs what is queued
            self.disk_queue.wait(("kv", layer, lane_index))
            if slot.disk_copied is not None:
                slot.disk_copied.synchronize()  # the last copy out of this landing area finished
            landed = part_views(slot.disk, self.kv_parts, (on_disk, b))
            for name, file in lane.disk.items():
                file.read_into(layer, 0, landed[name])
        self.streams.copy_waits(slot.free)  # the unit two back has finished with this slot
        slot.chunks = chunk_bounds(recompute_len, self.num_chunks)
        with self.streams.on_copy():
            if recompute_len:
                x_views = part_views(slot.x, self.x_parts, (c, b))
                for (start, end), ready in zip(slot.chunks, slot.x_ready):
                    for name, x_view in x_views.items():
                        x_view[start:end].copy_(lane.host.x_part(name, layer)[start:end], non_blocking=True)  # type: ignore[union-attr]
                    self.streams.record_on_copy(ready)  # chunk [start, end) of X has landed
            if on_cpu > recompute_len:
                for name, target in targets.items():
                    source = lane.host.part(name, layer)[recompute_len:on_cpu]  # type: ignore[union-attr]
                    target[base + recompute_len : base + on_cpu].copy_(source, non_blocking=True)
            if on_disk:
                for name, target in targets.items():
                    target[base + c : base + c + on_disk].copy_(landed[name], non_blocking=True)
                self.streams.record_on_copy(slot.disk_copied)  # the landing area may be refilled
            self.streams.record_on_copy(slot.kv_ready)
        return slot

    def _kv_views(self, slot: Staging, lane: Lane) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.model.config
        shape = (self.split.max_len, lane.size, cfg.num_kv_heads, cfg.head_dim)
        return flat_view(slot.k, shape), flat_view(slot.v, shape)  # [s_max, b, n_kv, d]

    def _decode_unit(self, layer_index: int, lane_index: int, slot: Staging | None) -> None:
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
            self.streams.compute_waits(slot.kv_ready)  # copied K,V (or their parts) have landed
            self._decode_landed(lane, slot, keys, values, context_len)
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

    def _decode_landed(
        self, lane: Lane, slot: Staging, keys: torch.Tensor, values: torch.Tensor, context_len: int
    ) -> None:
        """A codec's landed parts of the copied tokens, decoded into the K,V staging (compute stream).
        The copied CPU-tier tokens and the disk tier are one range: disk tokens exist only once the
        CPU tier is full."""
        if self.codec is None:
            return
        _on_gpu, on_cpu, on_disk = self.split.ranges(context_len)
        start, end = self.recompute_len, on_cpu + on_disk
        if start >= end:
            return
        parts = part_views(slot.enc, self.kv_parts, (self.split.cpu + self.split.disk, lane.size))
        cfg = self.model.config
        shape = (end - start, lane.size, cfg.num_kv_heads, cfg.head_dim)
        block = EncodedKV(self.codec.name, shape, {name: part[start:end] for name, part in parts.items()})
        k, v = self.codec.decode(block, self.dtype)  # [end - start, b, n_kv, d]
        g = self.split.gpu
        keys[g + start : g + end] = k
        values[g + start : g + end] = v

    def _recompute(self, layer_index: int, lane: Lane, slot: Staging, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K,V of the first ``l`` CPU-tier tokens from their X, each chunk as soon as it lands."""
        if not self.recompute_len:
            return
        g = self.split.gpu
        layer = self.layers[layer_index]
        x_views = part_views(slot.x, self.x_parts, (self.split.cpu, lane.size))
        for (start, end), ready in zip(slot.chunks, slot.x_ready):
            self.streams.compute_waits(ready)
            x = lane.host.decode_x({name: view[start:end] for name, view in x_views.items()})  # type: ignore[union-attr]
            rope = None if lane.rope_old is None else (lane.rope_old[0][start:end], lane.rope_old[1][start:end])
            layer.kv_into(x, rope, keys[g + start : g + end], values[g + start : g + end])

    def _store(self, layer: int, lane: Lane, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Write slots [start, start + t) of one layer to their tiers: k, v [t, b, n_kv, d], x [t, b, h]."""
        end = start + k.shape[0]
        g, c = self.split.gpu, self.split.cpu
        if start < g:  # GPU tier, on the compute stream
            stop = min(end, g)
            lane.gpu_k[layer][start:stop] = k[: stop - start]  # type: ignore[index]
            lane.gpu_v[layer][start:stop] = v[: stop - start]  # type: ignore[index]
        lo, hi = max(start, g), min(end, g + c)
        if lo < hi:  # CPU tier: encoded on the compute stream, device-to-host on the store stream after it
            host = lane.host
            assert host is not None
            tensors = [
                (host.part(name, layer), part) for name, part in self._parts(k, v, lo - start, hi - start).items()
            ]
            if self.store_inputs:
                encoded_x = host.encode_x(x[lo - start : hi - start])
                tensors += [(host.x_part(name, layer), part) for name, part in encoded_x.items()]
            with self.streams.on_store_after_compute():
                for stored, source in tensors:
                    part = source.contiguous()
                    self.streams.keep_alive_for_store(part)
                    stored[lo - g : hi - g].copy_(part, non_blocking=True)
        lo = max(start, g + c)
        if lo < end:  # disk tier: to pinned memory on the store stream, then the disk thread writes
            self._store_disk(layer, lane, lo - g - c, self._parts(k, v, lo - start, end - start))

    def _parts(self, k: torch.Tensor, v: torch.Tensor, lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Tokens [lo, hi) of k, v [t, b, n_kv, d] as the tiers store them: as computed, or encoded."""
        if self.codec is None:
            return {"k": k[lo:hi], "v": v[lo:hi]}
        return dict(self.codec.encode(k[lo:hi], v[lo:hi]).tensors)  # [hi - lo, b, ...] each

    def _store_disk(self, layer: int, lane: Lane, offset: int, parts: dict[str, torch.Tensor]) -> None:
        key = ("kv", layer, self.lanes.index(lane))
        if next(iter(parts.values())).shape[0] == 1:  # a decode token: through the lane's pinned landing area
            self.disk_queue.wait(key)  # its previous write has left the landing area
            out = {name: lane.token_out[name][layer] for name in parts}
            with self.streams.on_store_after_compute():
                for name, part in parts.items():
                    self.streams.keep_alive_for_store(part)
                    out[name].copy_(part, non_blocking=True)
                done = self.streams.event()
                self.streams.record_on_store(done)  # the landing area holds the token's parts
        else:  # the prompt: a blocking copy (once per run)
            out, done = {name: part.to("cpu").contiguous() for name, part in parts.items()}, None

        def write() -> None:
            if done is not None:
                done.synchronize()
            for name, rows in out.items():
                lane.disk[name].write(layer, offset, rows)

        self.disk_queue.submit(key, write)

    def _logits(self, all_logits: bool) -> torch.Tensor:
        outputs = []
        for index in range(len(self.lanes)):
            hidden = self.acts.get(index, self.streams)
            outputs.append(self.model.logits(hidden if all_logits else hidden[:, -1:]))
        return torch.cat(outputs)
