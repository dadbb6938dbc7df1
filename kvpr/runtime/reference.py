"""The sequential executor: the oracle every overlapped path is tested against.

Each decode layer fetches the host tier's tokens with blocking copies, recomputes the prefix of
them with plain ops, concatenates them after the GPU tier's tokens, attends once over the whole
assembly and writes back, in program order. No streams, no pieces, no reuse of buffers.
"""

from __future__ import annotations

import torch

from kvpr.models.common import attend, attention_bias
from kvpr.runtime.executor import Executor, StepLayout


class SequentialExecutor(Executor):
    """Plain program-order execution (``RuntimeConfig.overlap=False``)."""

    def _store_host(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> None:
        end = start + k.shape[0]
        for name, part in self.storage.codec.encode(k, v).tensors.items():
            self.storage.part(name, layer)[start:end] = part
        if self.storage.store_inputs:
            for name, part in self.storage.encode_x(x).items():
                self.storage.x_part(name, layer)[start:end] = part

    def _decode_layers(
        self,
        hidden: torch.Tensor,
        rope_new: tuple[torch.Tensor, torch.Tensor] | None,
        rope_old: tuple[torch.Tensor, torch.Tensor] | None,
        step: StepLayout,
    ) -> torch.Tensor:
        device, storage = self.device, self.storage
        recompute_len, host_len = step.recompute_len, step.host_len
        valid = [self.gpu_valid[:, : step.gpu_len], self.host_valid(0, host_len)]  # [b, *] each
        bias = attention_bias(torch.cat(valid, dim=1)[:, None, None, :], self.dtype)  # [b, 1, 1, G + h]
        for index, layer in enumerate(self.layers):
            x_new = layer.attn_input(hidden)  # [b, 1, h]
            k_new, v_new = layer.kv_from_input(x_new, rope_new)  # [b, 1, n_kv, d]
            self.write_new(index, step, k_new, v_new, x_new)
            gpu_k, gpu_v = self.gpu_keys(index)
            parts_k, parts_v = [gpu_k[: step.gpu_len]], [gpu_v[: step.gpu_len]]  # [G, b, n_kv, d]
            if recompute_len:
                stored_x = {n: storage.x_part(n, index)[:recompute_len] for n in storage.x_part_names}
                x_old = storage.decode_x({n: x.to(device) for n, x in stored_x.items()})  # [l, b, h]
                k_old, v_old = layer.kv_from_input(x_old, rope_old)  # [l, b, n_kv, d]
                parts_k.append(k_old)
                parts_v.append(v_old)
            if host_len > recompute_len:
                stored = {n: storage.part(n, index)[recompute_len:host_len].to(device) for n in storage.part_names}
                k_copied, v_copied = storage.codec.decode(storage.encoded(stored), self.dtype)  # [h - l, b, n_kv, d]
                parts_k.append(k_copied)
                parts_v.append(v_copied)
            keys = torch.cat(parts_k).permute(1, 2, 0, 3)  # [b, n_kv, G + h, d]
            values = torch.cat(parts_v).permute(1, 2, 0, 3)
            out = attend(layer.query(x_new, rope_new), keys, values, bias)
            if step.flush_to is not None:
                self._store_host(index, step.flush_to, *self.tail_block(index))
            hidden = layer.finish(hidden, out)
        return hidden
