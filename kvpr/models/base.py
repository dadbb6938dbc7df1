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

from kvpr.models.common import apply_rope, linear_into

if TYPE_CHECKING:
    from kvpr.config import ModelConfig

Rope = tuple[torch.Tensor, torch.Tensor] | None  # rotary tables (cos, sin), None in models without them


class DecoderLayer(nn.Module):
    """One transformer block, split at the KV cache."""

    def attn_input(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., h] residual stream -> [..., h] input of the attention projections (X)."""
        raise NotImplementedError

    head_dim: int

    def kv_projections(self) -> tuple[nn.Linear, nn.Linear]:
        """The K and V projections (checkpoint modules)."""
        raise NotImplementedError

    def kv_from_input(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """X [..., h] -> K, V [..., n_kv, d]; K rotated when the model uses RoPE."""
        k_proj, v_proj = self.kv_projections()
        k = k_proj(x).unflatten(-1, (-1, self.head_dim))  # [..., n_kv, d]
        v = v_proj(x).unflatten(-1, (-1, self.head_dim))  # [..., n_kv, d]
        return (k if rope is None else apply_rope(k, *rope)), v

    def kv_into(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        k_out: torch.Tensor,
        v_out: torch.Tensor,
    ) -> None:
        """X [..., h] -> K, V written in place into contiguous k_out, v_out [..., n_kv, d] (rope's
        tables broadcast against them as in ``kv_from_input``): recomputed K,V [t, b, n_kv, d] into
        a scratch buffer, or a new token's [b, 1, n_kv, d] into its cache slot.

        Same arithmetic as ``kv_from_input``; writing into the preallocated buffer (the rotated K
        too) saves copies and their launches, which matters when a decode step is launch-bound.
        """
        k_proj, v_proj = self.kv_projections()
        rows = x.reshape(-1, x.shape[-1])  # [t*b, h]
        linear_into(rows, k_proj, k_out.view(rows.shape[0], -1))
        linear_into(rows, v_proj, v_out.view(rows.shape[0], -1))
        if rope is not None:
            apply_rope(k_out, *rope, out=k_out)

    def query(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
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

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin [*positions.shape, 1, d] for rotary models, None otherwise."""
        return None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Residual stream [b, q, h] -> logits [b, q, vocab]."""
        raise NotImplementedError

    def tied_parameters(self) -> dict[str, str]:
        """Parameters a checkpoint may omit because they alias another: {alias: source}."""
        return {}
