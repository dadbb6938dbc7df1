"""Latency mode: weights on the GPU, K,V and X on the host, the KVPR split overlapped on streams.

Per decode step, with ``s`` cached tokens, ``r`` of them resident on the device and the
recomputed range ``l`` chosen by the policy, for each layer (double buffer ``p = layer % 2``)::

    copy stream    | X[r:r+l] in c chunks -> xbuf[p] | K,V[r+l:s] -> kvbuf[p] |      (layer+1 ...)
    compute stream | q, k_new, v_new | resident[0:r] -> kvbuf[p] | recompute chunk 1..c | attention | MLP
                                                        (waits each X chunk)   (waits K,V)

With a codec the copied K,V are the codec's parts, decoded on the compute stream after they land,
and the write-back is encoded first; an X codec (``--x-codec``) does the same for each X chunk,
decoded just before its recompute.

The loads of layer ``i+1`` are issued before layer ``i`` computes, so they stream in while it
runs. A buffer is refilled only after the layer two back has finished with it. The new token's
K, V and X go back to the host on the copy stream after its layer computed them.

When the cache is resident (``offloaded=False``) the same loop attends straight over storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvpr.models.common import attend
from kvpr.runtime.executor import Executor, SplitPolicy
from kvpr.runtime.streams import StreamSet

if TYPE_CHECKING:
    from kvpr.cache.codec import EncodedKV, KVCodec
    from kvpr.cache.storage import KVStorage
    from kvpr.models.base import DecoderModel


def chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split [0, length) into at most ``num_chunks`` near-equal non-empty ranges."""
    num_chunks = max(1, min(num_chunks, length))
    edges = [round(length * index / num_chunks) for index in range(num_chunks + 1)]
    return [(a, c) for a, c in zip(edges, edges[1:]) if c > a]


def decode_kv_into(
    codec: "KVCodec", encoded: "EncodedKV", dtype: torch.dtype, k_out: torch.Tensor, v_out: torch.Tensor, start: int
) -> None:
    """Decode a landed block of t tokens' codec parts into the staging buffers' rows [start, start+t)
    (the profiler times this same call)."""
    k, v = codec.decode(encoded, dtype)  # [t, b, n_kv, d]
    k_out[start : start + k.shape[0]] = k
    v_out[start : start + v.shape[0]] = v


class _LayerBuffers:
    """One of the two device staging buffers, with the events that order its use."""

    def __init__(self, storage: "KVStorage", device: torch.device, streams: StreamSet) -> None:
        shape = storage.shape
        kv_shape = (shape.max_len, shape.batch_size, shape.num_kv_heads, shape.head_dim)
        self.k = torch.empty(kv_shape, dtype=shape.dtype, device=device)  # [s_max, b, n_kv, d]
        self.v = torch.empty(kv_shape, dtype=shape.dtype, device=device)  # [s_max, b, n_kv, d]
        # X chunks land here: X itself [s_max, b, h], or an X codec's parts, decoded chunk by chunk.
        self.x_parts = {
            name: torch.empty_like(storage.x_part(name, 0), device=device)  # [s_max, b, ...]
            for name in storage.x_part_names
        }
        # A compressed tier's parts land here before they are decoded into k, v.
        self.parts = (
            {}
            if storage.raw
            else {
                name: torch.empty_like(storage.part(name, 0), device=device)  # [s_max, b, ...]
                for name in storage.part_names
            }
        )
        self.streams = streams
        self.x_ready: list[torch.cuda.Event | None] = []  # one per X chunk, grown to the most chunks asked
        self.kv_ready = streams.event()
        self.free = streams.event()
        self.chunks: list[tuple[int, int]] = []

    def set_chunks(self, chunks: list[tuple[int, int]]) -> None:
        self.chunks = chunks
        self.x_ready += [self.streams.event() for _ in range(len(chunks) - len(self.x_ready))]


class OverlappedExecutor(Executor):
    """Copies on a copy stream, recompute and attention on the compute stream, double buffered."""

    def __init__(
        self,
        model: "DecoderModel",
        storage: "KVStorage",
        device: torch.device,
        offloaded: bool,
        split: SplitPolicy,
        resident_cap: int = 0,
    ) -> None:
        super().__init__(model, storage, device, offloaded, split, resident_cap)
        self.streams = StreamSet(device)
        self.buffers = [_LayerBuffers(storage, device, self.streams) for _ in range(2)] if offloaded else []

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        end = start + k.shape[0]
        if not self.offloaded:
            self.storage.k(layer)[start:end] = k
            self.storage.v(layer)[start:end] = v
            return
        if self.storage.raw:
            tensors = [(self.storage.k(layer), k), (self.storage.v(layer), v)]
        else:  # encoded on the compute stream, so only the compressed bytes cross the link
            encoded = self.storage.codec.encode(k, v).tensors
            tensors = [(self.storage.part(name, layer), part) for name, part in encoded.items()]
        if self.storage.store_inputs:  # X encoded here too, if an X codec is set
            tensors += [(self.storage.x_part(name, layer), part) for name, part in self.storage.encode_x(x).items()]
        # Device-to-host on the copy stream, after the compute that produced the tensors.
        self.streams.copy_waits_compute()
        with self.streams.on_copy():
            for host, source in tensors:
                source = source.contiguous()
                self.streams.keep_alive_for_copy(source)
                host[start:end].copy_(source, non_blocking=True)

    def _issue_loads(self, layer: int, recompute_len: int, context_len: int, num_chunks: int) -> None:
        """Queue the loads of one layer on the copy stream: X of [r, r+l) in ``num_chunks`` chunks
        first, then the K,V of [r+l, s) (see the table in ``Executor``)."""
        buffers = self.buffers[layer % 2]
        storage = self.storage
        resident = self.resident_len
        copied_from = resident + recompute_len
        buffers.set_chunks([(resident + a, resident + c) for a, c in chunk_bounds(recompute_len, num_chunks)])
        self.streams.copy_waits(buffers.free)  # the layer two back has finished reading this buffer
        with self.streams.on_copy():
            for (start, end), ready in zip(buffers.chunks, buffers.x_ready):
                for name, staged in buffers.x_parts.items():
                    staged[start:end].copy_(storage.x_part(name, layer)[start:end], non_blocking=True)
                self.streams.record_on_copy(ready)  # chunk landed: its recompute may start
            targets = {"k": buffers.k, "v": buffers.v} if storage.raw else buffers.parts
            for name, staged in targets.items():
                staged[copied_from:context_len].copy_(
                    storage.part(name, layer)[copied_from:context_len], non_blocking=True
                )
            self.streams.record_on_copy(buffers.kv_ready)  # K,V of [r+l, s) landed: attention may start

    def _decode_layers(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        rope_new: tuple[torch.Tensor, torch.Tensor] | None,
        rope_old: tuple[torch.Tensor, torch.Tensor] | None,
        slot: int,
        recompute_len: int,
        num_chunks: int,
    ) -> torch.Tensor:
        streams = self.streams
        if self.offloaded:
            self._issue_loads(0, recompute_len, slot, num_chunks)
        for index, layer in enumerate(self.layers):
            if self.offloaded and index + 1 < len(self.layers):
                self._issue_loads(index + 1, recompute_len, slot, num_chunks)  # prefetch while this layer runs
            x_new = layer.attn_input(hidden)  # [b, 1, h]
            q = layer.query(x_new, rope_new)  # [b, n_q, 1, d]
            k_new, v_new = layer.kv_from_input(x_new, rope_new)  # [b, 1, n_kv, d]
            if self.offloaded:
                buffers = self.buffers[index % 2]
                keys, values = buffers.k, buffers.v
                resident = self.resident_len
                if resident:  # device-to-device, on the compute stream
                    keys[:resident] = self.resident_k[index]  # type: ignore[index]
                    values[:resident] = self.resident_v[index]  # type: ignore[index]
                for (start, end), ready in zip(buffers.chunks, buffers.x_ready):
                    streams.compute_waits(ready)  # X chunk is on the device
                    offset = slice(start - resident, end - resident)  # rope_old covers [r, r+l)
                    chunk_rope = None if rope_old is None else (rope_old[0][offset], rope_old[1][offset])
                    x_chunk = self.storage.decode_x({n: x[start:end] for n, x in buffers.x_parts.items()})
                    # recompute written in place into the staging buffer: [chunk, b, n_kv, d]
                    layer.kv_into(x_chunk, chunk_rope, keys[start:end], values[start:end])
                streams.compute_waits(buffers.kv_ready)  # copied K,V of [l, s) are on the device
                if not self.storage.raw and slot > resident + recompute_len:
                    self._decode_parts(buffers, resident + recompute_len, slot)
            else:
                keys, values = self.storage.k(index), self.storage.v(index)
            keys[slot] = k_new[:, 0]
            values[slot] = v_new[:, 0]
            out = attend(q, keys[: slot + 1].permute(1, 2, 0, 3), values[: slot + 1].permute(1, 2, 0, 3), mask)
            if self.offloaded:
                streams.record_on_compute(self.buffers[index % 2].free)  # buffer may be refilled
                self._store(index, slot, k_new.transpose(0, 1), v_new.transpose(0, 1), x_new.transpose(0, 1))
            hidden = layer.finish(hidden, out)
        return hidden

    def _decode_parts(self, buffers: _LayerBuffers, start: int, end: int) -> None:
        """Decode the copied parts of tokens [start, end) into the K,V staging buffer."""
        parts = {name: staged[start:end] for name, staged in buffers.parts.items()}
        decode_kv_into(self.storage.codec, self.storage.encoded(parts), self.dtype, buffers.k, buffers.v, start)

    def finish(self) -> None:
        self.streams.synchronize()
