"""The sequential executor: the oracle every overlapped path is tested against.

Each decode layer fetches what it needs with blocking copies, recomputes the prefix with plain
ops, concatenates, attends and writes back, in program order. No streams, no reuse of buffers.
"""

from __future__ import annotations

import torch

from kvpr.models.common import attend
from kvpr.runtime.executor import Executor


class SequentialExecutor(Executor):
    """Plain program-order execution (``RuntimeConfig.overlap=False``)."""

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        end = start + k.shape[0]
        for name, part in self.storage.codec.encode(k, v).tensors.items():
            self.storage.part(name, layer)[start:end] = part
        if self.storage.store_inputs:
            for name, part in self.storage.encode_x(x).items():
                self.storage.x_part(name, layer)[start:end] = part

    def _decode_layers(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        rope_new: tuple[torch.Tensor, torch.Tensor] | None,
        rope_old: tuple[torch.Tensor, torch.Tensor] | None,
        slot: int,
        recompute_len: int,
        num_chunks: int,  # the oracle recomputes [r, r+l) in one block
    ) -> torch.Tensor:
        device = self.device
        resident = self.resident_len
        copied_from = resident + recompute_len
        for index, layer in enumerate(self.layers):
            x_new = layer.attn_input(hidden)  # [b, 1, h]
            k_new, v_new = layer.kv_from_input(x_new, rope_new)  # [b, 1, n_kv, d]
            parts_k, parts_v = [], []
            if resident:
                parts_k.append(self.resident_k[index])  # type: ignore[index]  # [r, b, n_kv, d]
                parts_v.append(self.resident_v[index])  # type: ignore[index]
            if recompute_len:
                stored_x = {n: self.storage.x_part(n, index)[resident:copied_from] for n in self.storage.x_part_names}
                x_old = self.storage.decode_x({n: x.to(device) for n, x in stored_x.items()})  # [l, b, h]
                k_old, v_old = layer.kv_from_input(x_old, rope_old)  # [l, b, n_kv, d]
                parts_k.append(k_old)
                parts_v.append(v_old)
            stored = {n: self.storage.part(n, index)[copied_from:slot].to(device) for n in self.storage.part_names}
            k_copied, v_copied = self.storage.codec.decode(self.storage.encoded(stored), self.dtype)
            parts_k.append(k_copied)  # [s-r-l, b, n_kv, d]
            parts_v.append(v_copied)
            parts_k.append(k_new.transpose(0, 1))
            parts_v.append(v_new.transpose(0, 1))
            keys = torch.cat(parts_k).permute(1, 2, 0, 3)  # [b, n_kv, s+1, d]
            values = torch.cat(parts_v).permute(1, 2, 0, 3)
            out = attend(layer.query(x_new, rope_new), keys, values, mask)
            self._store(index, slot, k_new.transpose(0, 1), v_new.transpose(0, 1), x_new.transpose(0, 1))
            hidden = layer.finish(hidden, out)
        return hidden
