"""What every latency-mode executor shares: the model, the two cache tiers, the batch state, the
split policy.

An executor runs one batch: ``prefill`` once, then ``decode`` once per new token. Subclasses
differ only in how the host tier's tokens reach attention (blocking copies into one buffer, or
pieces pipelined on streams).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kvpr.models.common import attend, attention_bias
from kvpr.runtime.batch import BatchState
from kvpr.runtime.tiers import TierPlan, TierState
from kvpr.scheduler.plan import StepSplit
from kvpr.scheduler.policy import SplitPolicy

if TYPE_CHECKING:
    from kvpr.cache.storage import KVStorage
    from kvpr.models.base import DecoderLayer, DecoderModel, Rope


class Executor:
    """Base of the latency-mode executors.

    Args:
        model: weights on ``device``.
        storage: the host tier of an offloaded cache (slots ``[0, plan.host_slots)``), or the
            whole cache on ``device`` (``offloaded=False``, then also the GPU tier).
        offloaded: whether tokens beyond the GPU tier live in ``storage`` on the host, reached by
            copies (also on a CPU-only machine, where the copies are memcpy, so the offload path
            is tested there too).
        split: the recompute policy, asked once per decode step with the host tier's length.
        plan: the tiers' capacities (``kvpr.runtime.tiers``); None: every token on the device.
            Token ranges of a step, with ``h`` host tokens and the policy's ``l``::

                GPU slots [0, gpu_len)        prefix and tail, attended in place
                host [0, l)                   recomputed from X (X copied over the link)
                host [l, h)                   K,V copied over the link
    """

    def __init__(
        self,
        model: "DecoderModel",
        storage: "KVStorage",
        device: torch.device,
        offloaded: bool,
        split: SplitPolicy,
        plan: TierPlan | None = None,
    ) -> None:
        self.model = model
        self.storage = storage
        self.device = device
        shape = storage.shape
        self.dtype = shape.dtype
        self.offloaded = offloaded
        self.split = split
        self.layers: list[DecoderLayer] = model.decoder_layers
        if plan is None or not offloaded:
            plan = TierPlan.for_capacity(shape.max_len, shape.max_len)
        self.plan = plan
        self.tiers = TierState(plan)
        self.batch = BatchState(shape.batch_size, plan.max_len, device)
        self.recompute_lens: list[int] = []  # l chosen at each decode step (for reports)
        self.host_lens: list[int] = []  # host-tier tokens at each decode step (for floors)
        b, n_kv, d = shape.batch_size, shape.num_kv_heads, shape.head_dim
        if offloaded:  # the GPU tier: [L, G, b, n_kv, d]; X of the tail too, for its flush
            size = (shape.num_layers, plan.gpu_slots, b, n_kv, d)
            self.gpu_k = torch.empty(size, dtype=self.dtype, device=device)
            self.gpu_v = torch.empty(size, dtype=self.dtype, device=device)
            keeps_x = storage.store_inputs and plan.offloads
            x_size = (shape.num_layers, plan.tail_slots if keeps_x else 0, b, shape.hidden_size)
            self.tail_x = torch.empty(x_size, dtype=self.dtype, device=device)  # [L, tail, b, h]
        self.gpu_valid = torch.zeros(b, plan.gpu_slots, dtype=torch.bool, device=device)  # [b, G]
        # the GPU tier of every layer, [L, G, b, n_kv, d]: the storage itself when not offloaded
        if offloaded:
            self.tier_k, self.tier_v = self.gpu_k, self.gpu_v
        elif storage.raw:
            self.tier_k, self.tier_v = storage.all_layers("k"), storage.all_layers("v")

    def gpu_keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The GPU tier of one layer: K, V [G, b, n_kv, d] (the storage itself when not offloaded)."""
        if self.offloaded:
            return self.gpu_k[layer], self.gpu_v[layer]
        return self.storage.k(layer), self.storage.v(layer)

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt [b, q] (``valid`` marks real tokens); returns logits [b, q or 1, V]."""
        assert input_ids.shape == valid.shape and self.tiers.length == 0
        to_gpu, to_host = self.tiers.place_prompt(input_ids.shape[1])
        if not self.offloaded:
            self.storage.reserve(to_gpu)
        host_start = self.storage.reserve(to_host) if to_host else 0
        positions, mask = self.batch.append(valid)
        self.gpu_valid[:, :to_gpu] = valid[:, :to_gpu]
        rope = self.model.rope(positions, self.dtype)  # [b, q, 1, d]
        hidden = self.model.embed(input_ids, positions)  # [b, q, h]
        for index, layer in enumerate(self.layers):
            x = layer.attn_input(hidden)  # [b, q, h]
            k, v = layer.kv_from_input(x, rope)  # [b, q, n_kv, d]
            out = attend(layer.query(x, rope), k.transpose(1, 2), v.transpose(1, 2), mask)
            gpu_k, gpu_v = self.gpu_keys(index)
            gpu_k[:to_gpu] = k[:, :to_gpu].transpose(0, 1)
            gpu_v[:to_gpu] = v[:, :to_gpu].transpose(0, 1)
            if to_host:
                host = slice(to_gpu, to_gpu + to_host)
                self._store_host(
                    index,
                    host_start,
                    k[:, host].transpose(0, 1),
                    v[:, host].transpose(0, 1),
                    x[:, host].transpose(0, 1),
                )
            hidden = layer.finish(hidden, out)
        if not all_logits:
            hidden = hidden[:, -1:]
        return self.model.logits(hidden)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row, token_ids [b] -> logits [b, V]."""
        tiers = self.tiers
        host_len = tiers.host
        split = self.split(host_len) if host_len else StepSplit(0)
        assert 0 <= split.recompute_len <= host_len and split.num_chunks >= 1
        self.recompute_lens.append(split.recompute_len)
        self.host_lens.append(host_len)
        gpu_slot = tiers.next_gpu_slot()
        if not self.offloaded:
            self.storage.reserve(1)
        positions = self.batch.advance(torch.ones_like(token_ids, dtype=torch.bool).unsqueeze(1))
        self.gpu_valid[:, gpu_slot] = True
        tiers.add_token()
        flush_to = tiers.host if tiers.tail_full() else None  # host slot the full tail goes to
        step = StepLayout(gpu_slot, tiers.gpu_len, host_len, split.recompute_len, split.num_chunks, flush_to)
        logits = self._step_logits(token_ids, positions, step)
        if flush_to is not None:
            self.storage.reserve(tiers.tail)
            tiers.flushed()
            self.gpu_valid[:, self.plan.prefix_cap :] = False  # the tail is empty (attended whole by a graph)
        return logits

    def _step_logits(
        self, token_ids: torch.Tensor, positions: torch.Tensor, step: StepLayout, **layer_args: Any
    ) -> torch.Tensor:
        """The step's arithmetic once its bookkeeping is done: token_ids [b], positions [b, 1] ->
        logits [b, V] (``layer_args``: the subclass's ``_decode_layers`` options)."""
        hidden = self.model.embed(token_ids.unsqueeze(1), positions)  # [b, 1, h]
        rope_new = self.model.rope(positions, self.dtype)  # [b, 1, 1, d]
        rope_old = self.old_rope(step.recompute_len)
        hidden = self._decode_layers(hidden, rope_new, rope_old, step, **layer_args)
        return self.model.logits(hidden)[:, -1]

    def old_rope(self, recompute_len: int) -> Rope:
        """Rotary tables [l, b, 1, d] of host tokens [0, l), from the positions the batch state
        holds in place (a CUDA graph reads them there); None when nothing is recomputed."""
        if not recompute_len:
            return None
        host_first = self.plan.prefix_cap  # token index of host slot 0
        old_positions = self.batch.positions[:, host_first : host_first + recompute_len].transpose(0, 1)
        return self.model.rope(old_positions, self.dtype)

    def keeps_tail_x(self, gpu_slot: int) -> bool:
        """Whether a new token at ``gpu_slot`` is in a tail whose flush will need its X."""
        return self.offloaded and gpu_slot >= self.plan.prefix_cap and self.tail_x.shape[1] > 0

    def gpu_bias(self, gpu_len: int) -> torch.Tensor:
        """Additive bias [b, 1, 1, gpu_len] of the GPU tier's slots, for the one-piece attention."""
        return attention_bias(self.gpu_valid[:, None, None, :gpu_len], self.dtype)

    def host_valid(self, start: int, end: int) -> torch.Tensor:
        """bool [b, end - start]: which rows attend host slots [start, end)."""
        first = self.plan.prefix_cap
        return self.batch.valid[:, first + start : first + end]

    def write_new(
        self, layer: int, step: StepLayout, k_new: torch.Tensor, v_new: torch.Tensor, x_new: torch.Tensor
    ) -> None:
        """The new token's K,V [b, 1, n_kv, d] into its GPU slot; its X [b, 1, h] too when it is in
        a tail whose flush will need it."""
        gpu_k, gpu_v = self.gpu_keys(layer)
        gpu_k[step.gpu_slot] = k_new[:, 0]
        gpu_v[step.gpu_slot] = v_new[:, 0]
        if self.keeps_tail_x(step.gpu_slot):
            self.tail_x[layer, step.gpu_slot - self.plan.prefix_cap] = x_new[:, 0]

    def tail_block(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V [tail, b, n_kv, d] and X [tail, b, h] of one layer's full tail (what a flush moves)."""
        tail = slice(self.plan.prefix_cap, self.plan.gpu_slots)
        return self.gpu_k[layer, tail], self.gpu_v[layer, tail], self.tail_x[layer]

    def _decode_layers(
        self,
        hidden: torch.Tensor,
        rope_new: tuple[torch.Tensor, torch.Tensor] | None,
        rope_old: tuple[torch.Tensor, torch.Tensor] | None,
        step: StepLayout,
    ) -> torch.Tensor:
        raise NotImplementedError

    def _store_host(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Write tokens to host slots [start, start+t) of one layer: k, v [t, b, n_kv, d], x [t, b, h]
        (X only when the storage keeps it)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Wait for outstanding work (write-backs) so the cache may be read or freed."""

    def close(self) -> None:
        """The run is over: wait for its work and release what it holds outside memory (nothing here;
        throughput mode's disk files)."""
        self.finish()


class StepLayout:
    """One decode step's layout, the same for every layer."""

    __slots__ = ("gpu_slot", "gpu_len", "host_len", "recompute_len", "num_chunks", "flush_to")

    def __init__(
        self, gpu_slot: int, gpu_len: int, host_len: int, recompute_len: int, num_chunks: int, flush_to: int | None
    ) -> None:
        self.gpu_slot = gpu_slot  # where the new token's K,V go
        self.gpu_len = gpu_len  # GPU slots attended, the new token's included
        self.host_len = host_len  # host tokens attended: [0, l) recomputed, [l, h) copied
        self.recompute_len = recompute_len
        self.num_chunks = num_chunks  # X chunks the policy asked for
        self.flush_to = flush_to  # host slot of the tail's flush after this step, or None
