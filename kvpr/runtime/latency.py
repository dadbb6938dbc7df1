"""Latency mode: weights on the GPU, the cache in two tiers, attention pipelined with the copies.

Per decode step, with ``h`` tokens on the host tier and the recomputed range ``l`` chosen by the
policy, each layer attends its cache as pieces (``split_attention``), each as soon as it exists::

    copy stream    | X chunk 1 | X chunk 2 | K,V chunk 1 | K,V chunk 2 | ...   (layer+1 ...)
    compute stream | q, k, v | GPU tier | recompute 1, attend | recompute 2, attend | attend | attend | merge | MLP
    store stream   |                                  (a full tail: flushed to the host in one block per part)

The GPU tier (prefix and tail, ``kvpr.runtime.tiers``) is attended in place and never copied.
Host chunks land in two rings of a few slots (X and K,V); the copy stream refills a slot once the
compute stream has consumed it, in the order the step consumes chunks, so loads run ahead across
layers by as many chunks as the rings hold. With a codec the K,V chunks are the codec's parts,
decoded into a scratch buffer after they land; an X codec likewise for each X chunk.

When no token is on the host the step is one piece: plain attention over the GPU tier, exactly
the resident cache's arithmetic.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from kvpr.models.common import attend
from kvpr.runtime.executor import Executor, SplitPolicy, StepLayout
from kvpr.runtime.graphs import StepGraphs, graphs_cover_host_steps
from kvpr.runtime.split_attention import Partials, attend_piece, fused_decode
from kvpr.runtime.streams import StoreMark, StreamSet
from kvpr.runtime.tiers import TierPlan

if TYPE_CHECKING:
    from kvpr.cache.codec import EncodedKV, KVCodec
    from kvpr.cache.storage import CacheShape, KVStorage
    from kvpr.models.base import DecoderLayer, DecoderModel, Rope

RING_SLOTS = 4  # chunks in flight per ring: enough that the copy stream never waits on compute
SLOT_BYTES = 32 * 1024**2  # uncompressed K,V bytes per ring slot, when the caller fixes no size


def chunk_bounds(length: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split [0, length) into at most ``num_chunks`` near-equal non-empty ranges."""
    num_chunks = max(1, min(num_chunks, length))
    edges = [round(length * index / num_chunks) for index in range(num_chunks + 1)]
    return [(a, c) for a, c in zip(edges, edges[1:]) if c > a]


def tokens_per_slot(bytes_per_token: int, host_slots: int, slot_bytes: int = SLOT_BYTES) -> int:
    """Tokens of ``bytes_per_token`` each that fill a ring slot of ``slot_bytes``, within [1, host_slots]
    (the scheduler's cost model counts K,V chunks with the same rule)."""
    return max(1, min(host_slots, slot_bytes // bytes_per_token))


def slot_tokens_for(shape: "CacheShape", host_slots: int, slot_bytes: int = SLOT_BYTES) -> int:
    """Tokens per K,V ring slot: ``slot_bytes`` of uncompressed K,V, within [1, host_slots]."""
    per_token = 2 * shape.batch_size * shape.num_kv_heads * shape.head_dim * shape.element_size
    return tokens_per_slot(per_token, host_slots, slot_bytes)


def x_slot_tokens_for(shape: "CacheShape", host_slots: int, slot_bytes: int = SLOT_BYTES) -> int:
    """Tokens per X ring slot: ``slot_bytes`` of uncompressed X, within [1, host_slots]. Sized by
    X's own bytes (half of K,V's per token in an MHA model), so a recomputed range takes fewer
    chunks, and each chunk costs the host a recompute and a piece to issue."""
    return tokens_per_slot(shape.batch_size * shape.hidden_size * shape.element_size, host_slots, slot_bytes)


def decode_kv_into(
    codec: "KVCodec", encoded: "EncodedKV", dtype: torch.dtype, k_out: torch.Tensor, v_out: torch.Tensor, start: int
) -> None:
    """Decode a landed block of t tokens' codec parts into buffer rows [start, start+t)
    (the profiler times this same call)."""
    k, v = codec.decode(encoded, dtype)  # [t, b, n_kv, d]
    k_out[start : start + k.shape[0]] = k
    v_out[start : start + v.shape[0]] = v


class _Slot:
    """One ring slot: a buffer per stored part ([cap, b, ...]) and the events that order its use."""

    def __init__(self, tensors: dict[str, torch.Tensor], streams: StreamSet) -> None:
        self.tensors = tensors
        self.ready = streams.event()  # recorded on the copy stream when a chunk has landed
        self.free = streams.event()  # recorded on the compute stream when it is consumed
        self.fresh = False  # its next load needs no wait on ``free`` (a graphed step's first use)
        self._views: dict[int, dict[str, torch.Tensor]] = {}

    def views(self, tokens: int) -> dict[str, torch.Tensor]:
        """The first ``tokens`` rows of each part ([t, b, ...] views), made once per length: a step
        loads chunks of one or two lengths into every slot, layer after layer."""
        views = self._views.get(tokens)
        if views is None:
            views = self._views[tokens] = {name: t[:tokens] for name, t in self.tensors.items()}
        return views


class _Ring:
    """Slots filled in turn; a slot is refilled only after its last chunk was consumed."""

    def __init__(self, parts: dict[str, torch.Tensor], capacity: int, device: torch.device, streams: StreamSet):
        def slot() -> _Slot:
            shapes = {name: (capacity, *part.shape[1:]) for name, part in parts.items()}
            return _Slot(
                {n: torch.empty(shape, dtype=parts[n].dtype, device=device) for n, shape in shapes.items()}, streams
            )

        self.slots = [slot() for _ in range(RING_SLOTS)]
        self.issued = 0
        self.consumed = 0
        self.landed: deque[tuple[_Slot, int]] = deque()  # (slot, tokens) issued, not yet consumed

    def has_room(self) -> bool:
        return self.issued - self.consumed < len(self.slots)


class _Loads:
    """A step's host-to-device loads, issued in the order the step consumes them, each as soon as
    its ring has a free slot (so no load overtakes an earlier one on the copy stream)."""

    def __init__(self, storage: "KVStorage", streams: StreamSet, flushed: list[StoreMark]) -> None:
        self.streams = streams
        self.flushed = flushed  # per layer: the last write of its host slots
        self.pending: deque[tuple[_Ring, bool, int, int, int]] = deque()  # (ring, is_x, layer, start, end)
        # per ring kind (X: True) and layer: the host tier's parts, [s_max, b, ...] views made once
        layers = range(storage.shape.num_layers)
        self.sources = {
            True: [[storage.x_part(name, layer) for name in storage.x_part_names] for layer in layers],
            False: [[storage.part(name, layer) for name in storage.part_names] for layer in layers],
        }

    def begin(self, loads: list[tuple[_Ring, bool, int, int, int]], fork: tuple[_Ring, ...] = ()) -> None:
        """Queue a step's loads. ``fork``: the rings of a step that may be captured as a CUDA graph:
        the copy stream starts after the compute queued so far, and no slot's first load waits on
        an event recorded before the step (a capture may not wait on one)."""
        assert not self.pending
        if fork:
            self.streams.copy_waits_compute()
            for slot in (slot for ring in fork for slot in ring.slots):
                slot.fresh = True
        self.pending.extend(loads)
        self.pump()

    def pump(self) -> None:
        streams = self.streams
        while self.pending and self.pending[0][0].has_room():
            ring, is_x, layer, start, end = self.pending.popleft()
            slot = ring.slots[ring.issued % len(ring.slots)]
            if slot.fresh:
                slot.fresh = False
            else:
                streams.copy_waits(slot.free)  # its previous chunk has been consumed
            self.flushed[layer].copy_waits()  # host slots written by a flush or a join, once per write
            with streams.on_copy():
                for staged, source in zip(slot.views(end - start).values(), self.sources[is_x][layer]):
                    staged.copy_(source[start:end], non_blocking=True)
                streams.record_on_copy(slot.ready)
            ring.issued += 1
            ring.landed.append((slot, end - start))

    def take(self, ring: _Ring) -> tuple[dict[str, torch.Tensor], _Slot]:
        """The next chunk of ``ring``, once landed: its parts ([t, b, ...] views)."""
        slot, tokens = ring.landed.popleft()
        self.streams.compute_waits(slot.ready)
        return slot.views(tokens), slot

    def release(self, ring: _Ring, slot: _Slot) -> None:
        """The compute stream is done with ``slot``: it may be refilled, and the next loads issue."""
        self.streams.record_on_compute(slot.free)
        ring.consumed += 1
        self.pump()


class _Piece(NamedTuple):
    """One host chunk of a decode step, the same in every layer: host slots [start, end), which rows
    attend them (bool [b, t]), the rotary tables of its tokens (X chunks of rotary models: cos, sin
    [t, b, 1, d]), and the scratch rows its K,V are recomputed or decoded into (None: attended where
    they landed)."""

    start: int
    end: int
    valid: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None
    k: torch.Tensor | None  # [t, b, n_kv, d]
    v: torch.Tensor | None


class _StepViews:
    """What a decode step's layers read and write at the same places, as views made once a step (on
    a host-bound step each view made per layer is host time): per layer, the GPU tier's attended
    slots and their validity, and where the new token's K,V (and its X, for the tail's flush) go.

    Eager (``static`` None): the tier's used slots; the new K,V are projected straight into their
    slot. Static (a step a CUDA graph records, ``kvpr.runtime.graphs``): the tier's whole capacity,
    masked by validity, and the new K,V and X written at the device slot indices of ``static``.
    """

    __slots__ = ("gpu_k", "gpu_v", "gpu_valid", "new_k", "new_v", "new_x", "static", "tail_x")

    def __init__(self, executor: OverlappedExecutor, step: StepLayout, static: StepGraphs | None) -> None:
        tier_k, tier_v = executor.tier_k, executor.tier_v  # [L, G, b, n_kv, d]
        self.static = static
        keeps_x = executor.keeps_tail_x(step.gpu_slot)
        if static is None:
            self.gpu_k = tier_k[:, : step.gpu_len].unbind(0)  # L x [G, b, n_kv, d]
            self.gpu_v = tier_v[:, : step.gpu_len].unbind(0)
            self.gpu_valid = executor.gpu_valid[:, : step.gpu_len]  # [b, G]
            self.new_k = tier_k[:, step.gpu_slot].unsqueeze(2).unbind(0)  # L x [b, 1, n_kv, d], as k_new
            self.new_v = tier_v[:, step.gpu_slot].unsqueeze(2).unbind(0)
            tail_slot = step.gpu_slot - executor.plan.prefix_cap
            self.new_x = executor.tail_x[:, tail_slot].unsqueeze(2).unbind(0) if keeps_x else None  # L x [b, 1, h]
        else:
            self.gpu_k, self.gpu_v = tier_k.unbind(0), tier_v.unbind(0)
            self.gpu_valid = executor.gpu_valid  # [b, G]: unused slots False
            self.tail_x = executor.tail_x.unbind(0) if keeps_x else None  # L x [tail, b, h]

    def write_new(self, index: int, layer: DecoderLayer, x_new: torch.Tensor, rope: Rope) -> None:
        """The new token's K,V [b, 1, n_kv, d] from x_new [b, 1, h] into its GPU slot, and its X
        into the tail's X where a flush will need it."""
        static = self.static
        if static is None:
            layer.kv_into(x_new, rope, self.new_k[index], self.new_v[index])
            if self.new_x is not None:
                self.new_x[index].copy_(x_new)
            return
        layer.kv_into(x_new, rope, static.new_k, static.new_v)
        tier_k, tier_v = self.gpu_k[index], self.gpu_v[index]  # the whole tier, [G, b, n_kv, d]
        tier_k.index_copy_(0, static.slot, static.new_k.view(1, *tier_k.shape[1:]))
        tier_v.index_copy_(0, static.slot, static.new_v.view(1, *tier_v.shape[1:]))
        if self.tail_x is not None:
            tail_x = self.tail_x[index]  # [tail, b, h]
            tail_x.index_copy_(0, static.tail_slot, x_new.reshape(1, *tail_x.shape[1:]))


class OverlappedExecutor(Executor):
    """Copies on a copy stream, flushes on a store stream, recompute and attention on the compute
    stream; host chunks in two rings (see the module docstring).

    Args (beyond ``Executor``'s):
        slot_tokens: tokens per ring slot, both rings (None: ``SLOT_BYTES`` of uncompressed K,V in
            the K,V ring, of uncompressed X in the X ring).
        cuda_graph: replay decode steps as CUDA graphs (``kvpr.runtime.graphs``) where the split-KV
            kernel runs (CUDA, fp16/bf16): every step that flushes nothing, and that loads no host
            chunk or loads them uncompressed.
    """

    def __init__(
        self,
        model: "DecoderModel",
        storage: "KVStorage",
        device: torch.device,
        offloaded: bool,
        split: SplitPolicy,
        plan: TierPlan | None = None,
        slot_tokens: int | None = None,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(model, storage, device, offloaded, split, plan)
        self.streams = StreamSet(device, separate_store=True)
        self.flushed = [StoreMark(self.streams) for _ in self.layers]
        self.loads = _Loads(storage, self.streams, self.flushed)
        self.partials = Partials()  # one layer's partial outputs, buffers reused layer after layer
        self.fused_resident = fused_decode(device, self.dtype)  # the resident-only step: split-KV kernel, not SDPA
        tier_on_gpu = offloaded or storage.raw  # the GPU tier as raw K,V (``tier_k``), where a graph writes
        host_steps = graphs_cover_host_steps(cuda_graph, device, self.dtype, storage.raw, storage.x_codec is None)
        graphable = cuda_graph and self.fused_resident and tier_on_gpu
        self.graphs = StepGraphs(self, host_steps) if graphable else None
        self.slot_tokens = self.x_slot_tokens = 0
        if offloaded and self.plan.offloads:
            self.slot_tokens = slot_tokens or slot_tokens_for(storage.shape, self.plan.host_slots)
            self.x_slot_tokens = slot_tokens or x_slot_tokens_for(storage.shape, self.plan.host_slots)
            host_kv = {n: storage.part(n, 0) for n in storage.part_names}
            self.kv_ring = _Ring(host_kv, self.slot_tokens, device, self.streams)
            host_x = {n: storage.x_part(n, 0) for n in storage.x_part_names}
            self.x_ring = _Ring(host_x, self.x_slot_tokens, device, self.streams)
            s = storage.shape
            tokens = max(self.x_slot_tokens if host_x else 0, 0 if storage.raw else self.slot_tokens)
            scratch = (tokens, s.batch_size, s.num_kv_heads, s.head_dim)
            # K,V recomputed from an X chunk, or decoded from a codec chunk: [slot, b, n_kv, d]
            self.scratch_k = torch.empty(scratch, dtype=self.dtype, device=device)
            self.scratch_v = torch.empty(scratch, dtype=self.dtype, device=device)

    def _step_logits(
        self, token_ids: torch.Tensor, positions: torch.Tensor, step: StepLayout, **layer_args: Any
    ) -> torch.Tensor:
        if self.graphs is not None and not layer_args:
            logits = self.graphs.run(self, token_ids, positions, step)
            if logits is not None:
                return logits
        return super()._step_logits(token_ids, positions, step, **layer_args)

    def static_step(self, graphs: StepGraphs, partials: Partials, step: StepLayout) -> torch.Tensor:
        """The step on ``graphs``' static buffers, as a CUDA graph records it: logits [b, V]."""
        return self._step_logits(graphs.token_ids, graphs.positions, step, static=graphs, partials=partials)

    def settle_stores(self) -> None:
        """Before a graphed step: the compute stream waits for pending write-backs (a capture may
        not wait on an event recorded outside it)."""
        for mark in self.flushed:
            mark.settle()

    def after_replay(self) -> None:
        """After a graphed step: its reads of the ring slots end with it, so an eager step's loads
        may refill a slot once the compute queued so far is done."""
        if self.slot_tokens:
            for slot in (slot for ring in (self.kv_ring, self.x_ring) for slot in ring.slots):
                self.streams.record_on_compute(slot.free)

    @property
    def staging_bytes(self) -> int:
        """Device bytes of the rings and scratch buffers (what replaced the ``s_max`` staging)."""
        if not self.slot_tokens:
            return 0
        tensors = [t for ring in (self.kv_ring, self.x_ring) for slot in ring.slots for t in slot.tensors.values()]
        tensors += [self.scratch_k, self.scratch_v]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _store_host(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        storage = self.storage
        end = start + k.shape[0]
        if storage.raw:
            tensors = [(storage.k(layer), k), (storage.v(layer), v)]
        else:  # encoded on the compute stream, so only the compressed bytes cross the link
            tensors = [(storage.part(name, layer), part) for name, part in storage.codec.encode(k, v).tensors.items()]
        if storage.store_inputs:  # X encoded here too, if an X codec is set
            tensors += [(storage.x_part(name, layer), part) for name, part in storage.encode_x(x).items()]
        with self.streams.on_store_after_compute():  # device-to-host, after the compute that made them
            for host, source in tensors:
                source = source.contiguous()
                self.streams.keep_alive_for_store(source)
                host[start:end].copy_(source, non_blocking=True)
            self.flushed[layer].record()

    def _chunks(self, step: StepLayout) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """X chunks of host [0, l) (the policy's count, more if a slot is smaller) and K,V chunks of [l, h)."""
        recompute, host, cap = step.recompute_len, step.host_len, self.slot_tokens
        x_cap = self.x_slot_tokens
        x_chunks = chunk_bounds(recompute, max(step.num_chunks, -(-recompute // x_cap))) if recompute else []
        kv_chunks = [(a, min(a + cap, host)) for a in range(recompute, host, cap)]
        return x_chunks, kv_chunks

    def _pieces(self, step: StepLayout, rope_old: Rope) -> tuple[list[_Piece], list[_Piece]]:
        """The step's X and K,V chunks as pieces, in load order."""
        x_chunks, kv_chunks = self._chunks(step)

        def piece(a: int, c: int, rope: bool, scratch_kv: bool) -> _Piece:
            chunk_rope = None if not rope or rope_old is None else (rope_old[0][a:c], rope_old[1][a:c])  # [t, b, 1, d]
            k, v = (self.scratch_k[: c - a], self.scratch_v[: c - a]) if scratch_kv else (None, None)
            return _Piece(a, c, self.host_valid(a, c), chunk_rope, k, v)

        x_pieces = [piece(a, c, True, True) for a, c in x_chunks]
        kv_pieces = [piece(a, c, False, not self.storage.raw) for a, c in kv_chunks]
        return x_pieces, kv_pieces

    def _decode_layers(
        self,
        hidden: torch.Tensor,
        rope_new: Rope,
        rope_old: Rope,
        step: StepLayout,
        static: StepGraphs | None = None,
        partials: Partials | None = None,
    ) -> torch.Tensor:
        """The layers of one step; ``static``, ``partials``: the step a CUDA graph records
        (``static_step``), else the eager step."""
        storage, loads = self.storage, self.loads
        partials = self.partials if partials is None else partials
        views = _StepViews(self, step, static)
        x_pieces, kv_pieces = self._pieces(step, rope_old) if step.host_len else ([], [])
        if step.host_len:
            per_layer = [(self.x_ring, True, p.start, p.end) for p in x_pieces]
            per_layer += [(self.kv_ring, False, p.start, p.end) for p in kv_pieces]
            loads.begin(
                [(ring, is_x, index, a, c) for index in range(len(self.layers)) for ring, is_x, a, c in per_layer],
                fork=() if static is None else (self.x_ring, self.kv_ring),
            )
        # SDPA over the GPU tier alone where the split-KV kernel cannot run; else pieces (none on the host: one)
        one_piece_sdpa = static is None and not step.host_len and not self.fused_resident
        if one_piece_sdpa:
            bias = self.gpu_bias(step.gpu_len)  # one piece: the resident cache's own attention
        for index, layer in enumerate(self.layers):
            x_new = layer.attn_input(hidden)  # [b, 1, h]
            q = layer.query(x_new, rope_new)  # [b, n_q, 1, d]
            self.flushed[index].compute_waits()  # a flushed tail is copied before it is overwritten
            views.write_new(index, layer, x_new, rope_new)
            gpu_k, gpu_v = views.gpu_k[index], views.gpu_v[index]  # [G, b, n_kv, d]
            if one_piece_sdpa:
                out = attend(q, gpu_k.permute(1, 2, 0, 3), gpu_v.permute(1, 2, 0, 3), bias)
            else:
                partials.reset()
                query = q[:, :, 0].contiguous()  # [b, n_q, d]
                attend_piece(query, gpu_k, gpu_v, views.gpu_valid, partials)
                for piece in x_pieces:
                    parts, slot = loads.take(self.x_ring)
                    x_chunk = storage.decode_x(parts)  # [t, b, h]
                    layer.kv_into(x_chunk, piece.rope, piece.k, piece.v)  # [t, b, n_kv, d]
                    loads.release(self.x_ring, slot)
                    attend_piece(query, piece.k, piece.v, piece.valid, partials)
                for piece in kv_pieces:
                    parts, slot = loads.take(self.kv_ring)
                    if piece.k is None:
                        attend_piece(query, parts["k"], parts["v"], piece.valid, partials)
                    else:
                        decode_kv_into(storage.codec, storage.encoded(parts), self.dtype, piece.k, piece.v, 0)
                        attend_piece(query, piece.k, piece.v, piece.valid, partials)
                    loads.release(self.kv_ring, slot)
                out = partials.merge(self.dtype)  # [b, 1, n_q * d]
            if step.flush_to is not None:
                self._store_host(index, step.flush_to, *self.tail_block(index))
            hidden = layer.finish(hidden, out)
        if static is not None and step.host_len:
            self.streams.compute_waits_copy()  # a capture ends with every forked stream joined
        return hidden

    def finish(self) -> None:
        self.streams.synchronize()
