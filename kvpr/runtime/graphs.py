"""Decode steps replayed as CUDA graphs, the host-tier copies included.

A decode step is a few hundred small operations (a dozen per layer, more per host chunk), each
microseconds of device work; the host issuing them is the bottleneck (llama-3-8b 8 x 8K resident
on an H200: about 18 ms a step of Python and launches against a 5.6 ms HBM floor; opt-6.7b
32 x 256 fully offloaded: 0.5 ms a layer plus 0.16 ms an X chunk, as much as the PCIe floor).
Captured once and replayed, a step costs one launch, and its copies and compute overlap as the
captured streams order them.

A step's shape is its host-tier layout: (host tokens, recomputed tokens, X chunks, whether the tail
keeps X). Steps of one shape differ only in device state the graph reads: the new tokens and their
positions (static buffers), the slot the new K,V go to (``index_copy_`` at a device index), the
validity of the GPU tier's slots (attention runs over the tier's whole capacity, masked), and the
positions of the recomputed tokens (read from the batch state, rotated inside the graph). The
host tier's tokens do not move between flushes, so a shape lasts until the next flush (64 steps
by default); the step that flushes runs eagerly (a device-to-host copy is not captured).

The first step of a shape runs eagerly (that is the warm-up capture needs) and is then captured;
later steps of that shape replay it. ``MAX_GRAPHS`` shapes are kept. Off CUDA every graphable
step runs the same static-buffer body eagerly, so tests check what is recorded. The sequential
executor never uses a graph: it stays the plain oracle.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

import torch

from kvpr.runtime.split_attention import Partials, fused_decode

if TYPE_CHECKING:
    from kvpr.runtime.executor import StepLayout
    from kvpr.runtime.latency import OverlappedExecutor

MAX_GRAPHS = 4  # step shapes kept captured (a shape lasts a flush period; a few cover a join's reshapes)


class StepShape(NamedTuple):
    """What fixes a step's recorded work: its host chunks and whether the new X goes to the tail."""

    host_len: int
    recompute_len: int
    num_chunks: int
    keeps_x: bool


def graphs_cover_host_steps(
    cuda_graph: bool, device: torch.device, dtype: torch.dtype, raw_kv: bool, x_raw: bool
) -> bool:
    """Whether steps that load host chunks are replayed as graphs (the scheduler then plans them
    with no host issue cost): on CUDA with the split-KV kernel, K,V and X stored uncompressed (a
    codec's decode is not captured)."""
    return cuda_graph and fused_decode(device, dtype) and raw_kv and x_raw


class StepGraphs:
    """The executor's captured step shapes, and the static buffers every one of them reads.

    Static inputs: token ids [b], positions [b, 1], the new token's GPU slot [1] and its tail slot
    [1]. Each graph's output: logits [b, V], copied out on each replay (the caller samples from
    them while the next step may overwrite the buffer). The executor is passed to each call, never
    kept: the executor owns this object, and a reference back would make a cycle that holds the
    whole cache on the GPU until the garbage collector runs.
    """

    def __init__(self, executor: "OverlappedExecutor", host_steps: bool) -> None:
        b = executor.batch.valid.shape[0]
        device = executor.device
        self.host_steps = host_steps  # steps that load host chunks are graphed too
        self.token_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.tail_slot = torch.zeros(1, dtype=torch.long, device=device)
        shape = executor.storage.shape
        scratch = (b, 1, shape.num_kv_heads, shape.head_dim)  # the new token's K,V, as kv_into writes them
        self.new_k = torch.empty(scratch, dtype=executor.dtype, device=device)
        self.new_v = torch.empty(scratch, dtype=executor.dtype, device=device)
        self.eager_partials = Partials()  # off CUDA: the one set of partials every step uses
        # per shape: the graph, its logits buffer, and its partials (kept alive with the graph)
        self.captured: OrderedDict[StepShape, tuple[torch.cuda.CUDAGraph, torch.Tensor, Partials]] = OrderedDict()

    def shape_of(self, executor: "OverlappedExecutor", step: "StepLayout") -> StepShape | None:
        """The step's shape, or None where it runs eagerly (it flushes, or loads host chunks that
        are not graphed)."""
        if step.flush_to is not None or (step.host_len and not self.host_steps):
            return None
        keeps_x = executor.keeps_tail_x(step.gpu_slot)
        return StepShape(step.host_len, step.recompute_len, step.num_chunks if step.recompute_len else 0, keeps_x)

    def run(
        self, executor: "OverlappedExecutor", token_ids: torch.Tensor, positions: torch.Tensor, step: "StepLayout"
    ) -> torch.Tensor | None:
        """Logits [b, V] of ``step`` from its shape's graph (captured now on its first step), or
        None where the step is not graphed."""
        shape = self.shape_of(executor, step)
        if shape is None:
            return None
        self.token_ids.copy_(token_ids)
        self.positions.copy_(positions)
        self.slot.fill_(step.gpu_slot)
        self.tail_slot.fill_(max(0, step.gpu_slot - executor.plan.prefix_cap))
        if executor.device.type != "cuda":  # no graphs there: the same static-buffer step, eagerly (tests)
            return executor.static_step(self, self.eager_partials, step)
        executor.settle_stores()  # write-backs pending from an eager step, waited for outside the graph
        entry = self.captured.get(shape)
        if entry is None:
            return self._first_step(executor, step, shape)
        self.captured.move_to_end(shape)
        graph, logits, _ = entry
        graph.replay()
        executor.after_replay()
        return logits.clone()

    def _first_step(self, executor: "OverlappedExecutor", step: "StepLayout", shape: StepShape) -> torch.Tensor:
        """Run the step eagerly (the warm-up capture needs: Triton compiles, the allocator settles),
        then record it. The step is idempotent: replaying it rewrites the same slots with the same
        K,V. The eager run stays on the compute stream: a stream of its own per executor would
        leave a cuBLAS workspace behind per executor (torch keeps one per stream for good)."""
        partials = Partials()  # this shape's own: a graph must never see its buffers replaced
        logits = executor.static_step(self, partials, step).clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), executor.streams.compute_on_current():
            recorded = executor.static_step(self, partials, step)
        executor.after_replay()  # events recorded in capture are graph edges, not marks a later wait can use
        while len(self.captured) >= MAX_GRAPHS:
            self.captured.popitem(last=False)
        self.captured[shape] = (graph, recorded, partials)
        return logits
