"""What every executor shares: the model, the cache storage, the batch state, the split policy.

An executor runs one batch: ``prefill`` once, then ``decode`` once per new token. Subclasses
differ only in how cached K,V reach attention (sequentially, or overlapped on streams).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvpr.models.common import attend, attention_bias
from kvpr.runtime.batch import BatchState
from kvpr.scheduler.plan import StepSplit
from kvpr.scheduler.policy import SplitPolicy

if TYPE_CHECKING:
    from kvpr.cache.storage import KVStorage
    from kvpr.models.base import DecoderLayer, DecoderModel


class Executor:
    """Base of the latency-mode executors.

    Args:
        model: weights on ``device``.
        storage: the cache; on ``device`` (resident) or on the host (offloaded).
        offloaded: whether ``storage`` is a host tier reached by copies (also true on a CPU-only
            machine, where the copies are memcpy, so the offload path is tested there too).
        split: the recompute policy, asked once per decode step with the offloaded length.
        resident_cap: at most this many of the oldest tokens (the prompt's first) keep a copy of
            their K,V on ``device``; decode steps never copy them. Token ranges of a step::

                [0, r)          resident on the device
                [r, r + l)      recomputed from X (copied over the link)
                [r + l, s)      K,V copied over the link
                s               the new token
    """

    def __init__(
        self,
        model: "DecoderModel",
        storage: "KVStorage",
        device: torch.device,
        offloaded: bool,
        split: SplitPolicy,
        resident_cap: int = 0,
    ) -> None:
        self.model = model
        self.storage = storage
        self.device = device
        self.dtype = storage.shape.dtype
        self.offloaded = offloaded
        self.split = split
        self.layers: list[DecoderLayer] = model.decoder_layers
        self.batch = BatchState(storage.shape.batch_size, storage.shape.max_len, device)
        self.recompute_lens: list[int] = []  # l chosen at each decode step (for reports)
        self.resident_cap = resident_cap if offloaded else 0
        self.resident_len = 0  # r, fixed by prefill
        self.resident_k: torch.Tensor | None = None  # [L, r, b, n_kv, d] on device
        self.resident_v: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, valid: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt [b, q] (``valid`` marks real tokens); returns logits [b, q or 1, V]."""
        assert input_ids.shape == valid.shape and self.storage.length == 0
        start = self.storage.reserve(input_ids.shape[1])
        self._make_resident(min(self.resident_cap, input_ids.shape[1]))
        positions, mask = self.batch.append(valid)
        rope = self.model.rope(positions, self.dtype)  # [b, q, 1, d]
        hidden = self.model.embed(input_ids, positions)  # [b, q, h]
        for index, layer in enumerate(self.layers):
            x = layer.attn_input(hidden)  # [b, q, h]
            k, v = layer.kv_from_input(x, rope)  # [b, q, n_kv, d]
            out = attend(layer.query(x, rope), k.transpose(1, 2), v.transpose(1, 2), mask)
            self._store(index, start, k.transpose(0, 1), v.transpose(0, 1), x.transpose(0, 1))
            if self.resident_len:
                self.resident_k[index] = k[:, : self.resident_len].transpose(0, 1)  # type: ignore[index]
                self.resident_v[index] = v[:, : self.resident_len].transpose(0, 1)  # type: ignore[index]
            hidden = layer.finish(hidden, out)
        if not all_logits:
            hidden = hidden[:, -1:]
        return self.model.logits(hidden)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """One new token per row, token_ids [b] -> logits [b, V]."""
        context_len = self.storage.length
        resident = self.resident_len
        split = self.split(context_len - resident) if self.offloaded else StepSplit(0)
        recompute_len = split.recompute_len
        assert 0 <= recompute_len <= context_len - resident and split.num_chunks >= 1
        self.recompute_lens.append(recompute_len)
        slot = self.storage.reserve(1)
        positions, valid = self.batch.append(torch.ones_like(token_ids, dtype=torch.bool).unsqueeze(1))
        mask = attention_bias(valid, self.dtype)  # [b, 1, 1, s+1], shared by every layer
        hidden = self.model.embed(token_ids.unsqueeze(1), positions)  # [b, 1, h]
        rope_new = self.model.rope(positions, self.dtype)  # [b, 1, 1, d]
        old_positions = self.batch.positions[:, resident : resident + recompute_len].transpose(0, 1)  # [l, b]
        rope_old = self.model.rope(old_positions, self.dtype) if recompute_len else None  # [l, b, 1, d]
        hidden = self._decode_layers(hidden, mask, rope_new, rope_old, slot, recompute_len, split.num_chunks)
        return self.model.logits(hidden)[:, -1]

    def _make_resident(self, resident_len: int) -> None:
        self.resident_len = resident_len
        if resident_len:
            shape = self.storage.shape
            size = (shape.num_layers, resident_len, shape.batch_size, shape.num_kv_heads, shape.head_dim)
            self.resident_k = torch.empty(size, dtype=self.dtype, device=self.device)
            self.resident_v = torch.empty(size, dtype=self.dtype, device=self.device)

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
        raise NotImplementedError

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        """Write tokens [start, start+t) of one layer: k, v [t, b, n_kv, d], x [t, b, h]."""
        raise NotImplementedError

    def finish(self) -> None:
        """Wait for outstanding work (write-backs) so the cache may be read or freed."""
