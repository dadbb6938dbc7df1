"""The resident-only decode step as one CUDA graph.

With the whole cache on the GPU a decode step is a few hundred small kernels (a dozen per layer)
whose work is microseconds each: the host issuing them is the bottleneck (llama-3-8b, 8 x 8K on an
H200: about 18 ms a step of Python and launches against a 5.6 ms HBM floor). Captured once and
replayed, the step costs one launch. What changes from step to step lives in device tensors the
graph reads: the new tokens and their positions, the slot the new K,V go to (``index_copy_``), and
the validity of the GPU tier's slots; attention runs the split-KV kernel over the tier's whole
capacity, masked by that validity, so no shape depends on the step.

Only steps with no host-tier work qualify (no chunk to copy, no tail to flush, no X to keep); the
overlapped executor runs every other step eagerly. The sequential executor never uses a graph: it
stays the plain oracle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvpr.runtime.split_attention import Partials, attend_resident

if TYPE_CHECKING:
    from kvpr.runtime.latency import OverlappedExecutor

WARMUP_STEPS = 2  # eager runs on a side stream before capture (Triton compiles, buffers settle)


class ResidentStepGraph:
    """Captures the executor's resident-only step on first use and replays it after.

    Static inputs: token ids [b], positions [b, 1], the new slot [1]. Output: logits [b, V], copied
    out on each step (the caller samples from them while the next step may overwrite the buffer).
    The executor is passed to each call, never kept: the executor owns this object, and a reference
    back would make a cycle that holds the whole cache on the GPU until the garbage collector runs.
    """

    def __init__(self, executor: "OverlappedExecutor") -> None:
        b = executor.batch.valid.shape[0]
        device = executor.device
        self.token_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        shape = executor.storage.shape
        scratch = (b, 1, shape.num_kv_heads, shape.head_dim)  # the new token's K,V, as kv_into writes them
        self.new_k = torch.empty(scratch, dtype=executor.dtype, device=device)
        self.new_v = torch.empty(scratch, dtype=executor.dtype, device=device)
        self.partials = Partials()
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def run(
        self, executor: "OverlappedExecutor", token_ids: torch.Tensor, positions: torch.Tensor, gpu_slot: int
    ) -> torch.Tensor:
        """Logits [b, V] of one resident-only step of ``executor``: the new K,V go to ``gpu_slot``."""
        self.token_ids.copy_(token_ids)
        self.positions.copy_(positions)
        self.slot.fill_(gpu_slot)
        if executor.device.type != "cuda":  # no graphs there: the same static-buffer step, eagerly (tests)
            return self._step(executor)
        if self.graph is None:
            self._capture(executor)
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits.clone()

    def _capture(self, executor: "OverlappedExecutor") -> None:
        """Warm up on a side stream (the step is idempotent: it rewrites the same slot with the same
        K,V), then record it; the recorded step itself is replayed by ``run``."""
        device = executor.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step(executor)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step(executor)
        self.graph = graph

    def _step(self, executor: "OverlappedExecutor") -> torch.Tensor:
        """The resident-only step on the static buffers: logits [b, V]."""
        model, dtype = executor.model, executor.dtype
        valid = executor.gpu_valid  # [b, G]: the tier's whole capacity, unused slots False
        hidden = model.embed(self.token_ids.unsqueeze(1), self.positions)  # [b, 1, h]
        rope = model.rope(self.positions, dtype)
        b = hidden.shape[0]
        for index, layer in enumerate(executor.layers):
            tier_k, tier_v = executor.tier_k[index], executor.tier_v[index]  # [G, b, n_kv, d]
            x_new = layer.attn_input(hidden)  # [b, 1, h]
            q = layer.query(x_new, rope)  # [b, n_q, 1, d]
            layer.kv_into(x_new, rope, self.new_k, self.new_v)
            tier_k.index_copy_(0, self.slot, self.new_k.view(1, b, *tier_k.shape[2:]))
            tier_v.index_copy_(0, self.slot, self.new_v.view(1, b, *tier_v.shape[2:]))
            out = attend_resident(q, tier_k, tier_v, valid, self.partials)  # [b, 1, n_q * d]
            hidden = layer.finish(hidden, out)
        return model.logits(hidden)[:, -1]
