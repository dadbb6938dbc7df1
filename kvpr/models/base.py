"""The interface the runtime drives: embed, per-layer pieces, logits.

A decoder layer is cut where the cache sits: ``attn_input`` gives the layer input X (what kvpr may
store instead of K,V), ``kv_from_input`` turns X into K,V (shared by the normal path and by
recomputation), ``query`` gives Q, and ``finish`` applies the output projection, residual and MLP.
Models never allocate cache and never touch a stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from kvpr.config import ModelConfig


class DecoderLayer(nn.Module):
    """One transformer block, split at the KV cache."""

    def attn_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., h] residual stream -> [..., h] input of the attention projections (X)."""
        raise NotImplementedError

    def kv_from_input(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X [..., h] -> K, V [..., n_kv, d]; K rotated when the model uses RoPE."""
        raise NotImplementedError

    def kv_into(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        k_out: torch.Tensor,
        v_out: torch.Tensor,
    ) -> None:
        """Recompute: X [t, b, h] -> K, V written in place into contiguous k_out, v_out [t, b, n_kv, d].

        Same arithmetic as ``kv_from_input``; writing into the preallocated buffer saves a copy
        and a kernel launch per chunk, which matters when a decode step is launch-bound.
        """
        k, v = self.kv_from_input(x, rope)
        k_out.copy_(k)
        v_out.copy_(v)

    def query(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """X [b, q, h] -> Q [b, n_q, q, d]."""
        raise NotImplementedError

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """Residual stream [b, q, h] and attention output [b, q, n_q*d] -> next residual stream."""
        raise NotImplementedError


class DecoderModel(nn.Module):
    """A decoder-only LM whose parameter names match the Hugging Face checkpoint."""

    config: "ModelConfig"

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token ids [b, q] at positions [b, q] -> residual stream [b, q, h]."""
        raise NotImplementedError

    def rope(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [*positions.shape, 1, d] for rotary models, None otherwise."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual stream [b, q, h] -> logits [b, q, vocab]."""
        raise NotImplementedError

    def tied_parameters(self) -> dict[str, str]:
        """Parameters a checkpoint may omit because they alias another: {alias: source}."""
        return {}
