"""Batches a server drives step by step: ``RowBatch`` lets prompts join a running batch between
decode steps (continuous batching over the dense latency-mode cache), ``FixedBatch`` runs caches
that must be prefilled whole. Where a row's tokens go is ``_TierLayout``'s; the host tier's rows
are written by ``kvpr.runtime.host_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from kvpr.models.common import attend
from kvpr.runtime.batch import BatchState
from kvpr.runtime.executor import Executor
from kvpr.runtime.generation import left_pad
from kvpr.runtime.host_rows import HostRows, row_runs
from kvpr.runtime.tiers import TierState


def supports_row_joins(executor: object) -> bool:
    """Whether prompts may join ``executor``'s batch between decode steps: the dense latency-mode
    cache, whose rows are independent token-major slots. The cache methods and throughput mode keep
    per-layer state that one prefill builds for the whole batch, so their batches run whole."""
    return isinstance(executor, Executor)


class RowBatch:
    """A dense cache whose free rows take new prompts between decode steps (continuous batching).

    All rows share one token count ``S``. ``start`` prefills a fresh batch (rows without a prompt
    are all padding); afterwards ``join`` prefills prompts of at most ``S`` tokens on their own rows
    and writes them right-aligned into tokens ``[S - q, S)`` of rows whose request ended, which the
    other rows never see. Validity says which tokens of a row are its own::

        [0, S - q)        nothing: the row's earlier request, or padding
        [S - q, S)        the new prompt (its own left padding invalid), then each generated token

    The slot count only grows; ``reset`` empties the batch once no row is live. Rows join only
    where the host tier stores K,V and X exactly (``joins_running``): under a lossy codec a token's
    stored form depends on where it lands (a GPU slot keeps it exact), which a join would change.
    """

    def __init__(self, executor: Executor) -> None:
        if not supports_row_joins(executor):
            raise ValueError(f"{type(executor).__name__} keeps no independent rows: run it as a FixedBatch")
        self.executor = executor
        self.layout = _TierLayout(executor)
        self.joins_running = executor.storage.raw and executor.storage.x_codec is None

    @property
    def width(self) -> int:
        return self.executor.batch.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.executor.batch.valid.shape[1]

    @property
    def length(self) -> int:
        """S: tokens in every row's slots, padding included."""
        return self.executor.batch.length

    def reset(self) -> None:
        """Forget every row: the next ``start`` prefills at token 0 (the storage is reused)."""
        executor = self.executor
        executor.finish()
        executor.batch = BatchState(self.width, self.capacity, executor.device)
        self.layout.reset(executor)
        for name in ("recompute_lens", "host_lens"):
            getattr(executor, name, []).clear()

    def start(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Prefill an empty batch: ``prompts`` on ``rows``, the other rows all padding. Returns the
        logits [k, V] after each prompt's last token."""
        assert self.length == 0, "start an empty batch (reset it first)"
        input_ids, valid = left_pad(prompts, pad_id, self.executor.device)  # [k, q]
        index = torch.tensor(list(rows), dtype=torch.long, device=self.executor.device)  # [k]
        all_ids = torch.full((self.width, input_ids.shape[1]), pad_id, dtype=torch.long, device=index.device)
        all_valid = torch.zeros_like(all_ids, dtype=torch.bool)  # [b, q]
        all_ids[index], all_valid[index] = input_ids, valid
        return self.executor.prefill(all_ids, all_valid)[index, -1]

    def fits(self, prompt_len: int) -> bool:
        """Whether a prompt may join now: it must lie within the tokens the batch already has."""
        return self.joins_running and 0 < prompt_len <= self.length

    @torch.inference_mode()
    def join(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Prefill ``prompts`` (each ``fits``) on the free ``rows`` and place them in the last
        tokens; returns the logits [k, V] after each prompt's last token. Live rows are untouched."""
        executor = self.executor
        assert all(self.fits(len(ids)) for ids in prompts)
        # No wait for the device: the rows' GPU slots are written on the compute stream after the
        # steps queued so far, their host slots on the store stream after that compute.
        input_ids, valid = left_pad(prompts, pad_id, executor.device)  # [k, q]
        index = torch.tensor(list(rows), dtype=torch.long, device=executor.device)  # [k]
        start = self.length - input_ids.shape[1]
        model = executor.model
        positions, mask = BatchState(*input_ids.shape, executor.device).append(valid)  # [k, q], [k, 1, q, q]
        rope = model.rope(positions, executor.dtype)  # [k, q, 1, d]
        hidden = model.embed(input_ids, positions)  # [k, q, h]
        runs = row_runs(rows)
        self.layout.clear_rows(executor, index)
        for layer_index, layer in enumerate(executor.layers):  # Executor.prefill's arithmetic, on k rows
            x = layer.attn_input(hidden)  # [k, q, h]
            k, v = layer.kv_from_input(x, rope)  # [k, q, n_kv, d]
            out = attend(layer.query(x, rope), k.transpose(1, 2), v.transpose(1, 2), mask)
            tokens = (k.transpose(0, 1), v.transpose(0, 1), x.transpose(0, 1))  # [q, k, ...] each
            self.layout.write(executor, layer_index, index, runs, start, valid, *tokens)
            hidden = layer.finish(hidden, out)
        executor.batch.place(index, valid)
        return model.logits(hidden[:, -1:])[:, -1]  # [k, V]

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One decode step of every row ([b] -> logits [b, V]); free rows run on any token, unread."""
        logits = self.executor.decode(token_ids)
        for name in ("recompute_lens", "host_lens"):  # a server runs for days: keep the last step's
            del getattr(self.executor, name, [])[:-1]
        return logits

    def last_split(self) -> tuple[int, int]:
        """(l, host tokens) of the last decode step: recomputed from X, and all read from the host."""
        return self.layout.last_split(self.executor)

    def link_bytes(self) -> tuple[int, int]:
        """(host-to-device, device-to-host) bytes a decode step moves now, all layers; device-to-host
        is the new token's share of the write-back."""
        executor, storage = self.executor, self.executor.storage
        if not executor.offloaded:
            return 0, 0
        recompute_len, host_len = self.last_split()
        kv_token = sum(storage.part(name, 0)[0].nbytes for name in storage.part_names)  # all rows
        x_token = sum(storage.x_part(name, 0)[0].nbytes for name in storage.x_part_names)
        layers = storage.shape.num_layers
        return layers * (recompute_len * x_token + (host_len - recompute_len) * kv_token), layers * (kv_token + x_token)


class _TierLayout:
    """Where a dense executor keeps token ``t`` of a row, for ``RowBatch`` to write rows: the two
    tiers of ``kvpr.runtime.tiers`` (a GPU prefix, the host tier, then the GPU tail)."""

    def __init__(self, executor: Any) -> None:
        self.host_rows = HostRows(executor)

    def reset(self, executor: Any) -> None:
        executor.tiers = TierState(executor.plan)
        executor.storage.length = 0
        executor.gpu_valid.zero_()

    def clear_rows(self, executor: Any, rows: torch.Tensor) -> None:
        """Forget every GPU-tier token of ``rows`` (the host tier's validity is the batch state's)."""
        executor.gpu_valid[rows] = False

    def write(
        self,
        executor: Any,
        layer: int,
        rows: torch.Tensor,
        runs: list[tuple[int, int, int]],
        start: int,
        valid: torch.Tensor,
        *tokens: torch.Tensor,
    ) -> None:
        """Tokens [start, start+q) of ``rows`` [k] (``runs``: the same as ``row_runs``): k, v
        [q, k, n_kv, d], x [q, k, h]; valid [k, q]."""
        k, v, x = tokens
        self.host_rows.wait_flush(layer)
        tiers, plan = executor.tiers, executor.plan
        end, host_end = start + k.shape[0], tiers.prefix + tiers.host
        gpu_k, gpu_v = executor.gpu_keys(layer)
        pieces = [  # (first token, end token, GPU slot of the first token or None: host)
            (start, min(end, tiers.prefix), start),
            (max(start, tiers.prefix), min(end, host_end), None),
            (max(start, host_end), end, plan.prefix_cap + max(start, host_end) - host_end),
        ]
        for first, last, slot in pieces:
            if last <= first:
                continue
            block = slice(first - start, last - start)
            if slot is None:
                self.host_rows.store(executor.storage, layer, runs, first - tiers.prefix, k[block], v[block], x[block])
                continue
            gpu_k[slot : slot + last - first, rows] = k[block]
            gpu_v[slot : slot + last - first, rows] = v[block]
            executor.gpu_valid[rows, slot : slot + last - first] = valid[:, block]
            tail = slot - plan.prefix_cap
            if tail >= 0 and executor.tail_x.shape[1]:  # X of the tail, for its flush to the host
                executor.tail_x[layer, tail : tail + last - first, rows] = x[block]

    def last_split(self, executor: Any) -> tuple[int, int]:
        recompute_len = executor.recompute_lens[-1] if executor.recompute_lens else 0
        return recompute_len, executor.host_lens[-1] if executor.host_lens else 0


class FixedBatch:
    """A batch prefilled whole, for caches that cannot take a row mid-run (the cache methods keep
    per-layer state one prefill builds; throughput mode keeps per-lane tiers): rows that finish early
    idle, and new prompts wait until the batch is done. ``executor`` has exactly ``width`` rows."""

    joins_running = False

    def __init__(self, executor: Any, width: int) -> None:
        self.executor = executor
        self.width = width
        self.length = 0

    def start(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
        """Prefill the whole batch once: ``rows`` are 0..width-1."""
        assert self.length == 0 and list(rows) == list(range(self.width)), "a FixedBatch is prefilled once, whole"
        input_ids, valid = left_pad(prompts, pad_id, self.executor.device)  # [k, q]
        self.length = input_ids.shape[1]
        return self.executor.prefill(input_ids, valid)[:, -1]  # [k, V]

    def fits(self, prompt_len: int) -> bool:
        return False

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        self.length += 1
        logits = self.executor.decode(token_ids)
        del self.executor.recompute_lens[:-1]
        return logits  # type: ignore[no-any-return]

    def last_split(self) -> tuple[int, int]:
        lens = self.executor.recompute_lens
        return (lens[-1] if lens else 0), 0

    def link_bytes(self) -> tuple[int, int]:
        """(host-to-device, device-to-host) bytes of the last step where the executor counts them
        (the compressed caches count what they copy; throughput mode does not: zero)."""
        step_bytes = getattr(self.executor, "step_bytes", None)
        return (step_bytes()[1], 0) if step_bytes is not None else (0, 0)
