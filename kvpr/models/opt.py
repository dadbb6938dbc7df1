"""OPT (MHA, learned positions, pre- or post-LN, optional word_embed_proj_dim projections)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpr.config import ModelConfig
from kvpr.models.base import DecoderLayer, DecoderModel

# OPT's learned position table starts 2 rows in (a fairseq convention kept by the checkpoints).
_POSITION_OFFSET = 2


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_q_heads, cfg.head_dim
        h, bias = cfg.hidden_size, cfg.linear_bias
        self.q_proj = nn.Linear(h, cfg.q_size, bias=bias)  # q_size = kv_size = h, or a rank's share of it
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=bias)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=bias)
        self.out_proj = nn.Linear(cfg.q_size, h, bias=bias)


class OPTLayer(DecoderLayer):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, affine = cfg.hidden_size, cfg.layer_norm_affine
        self.pre_layer_norm = cfg.pre_layer_norm
        self.head_dim = cfg.head_dim
        self.activation = F.relu if cfg.activation == "relu" else F.gelu
        self.self_attn = OPTAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(h, elementwise_affine=affine, bias=affine)
        self.fc1 = nn.Linear(h, cfg.intermediate_size, bias=cfg.linear_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, h, bias=cfg.linear_bias)
        self.final_layer_norm = nn.LayerNorm(h, elementwise_affine=affine, bias=affine)

    def attn_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.self_attn_layer_norm(hidden) if self.pre_layer_norm else hidden

    def kv_projections(self) -> tuple[nn.Linear, nn.Linear]:
        attn = self.self_attn
        return attn.k_proj, attn.v_proj

    def query(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        attn = self.self_attn
        return attn.q_proj(x).unflatten(-1, (attn.num_heads, attn.head_dim)).transpose(1, 2)  # [b, n_q, q, d]

    def finish(self, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn.out_proj(attn_out)
        if not self.pre_layer_norm:
            hidden = self.self_attn_layer_norm(hidden)
        mlp_in = self.final_layer_norm(hidden) if self.pre_layer_norm else hidden
        hidden = hidden + self.fc2(self.activation(self.fc1(mlp_in)))
        return hidden if self.pre_layer_norm else self.final_layer_norm(hidden)


class OPTDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        proj_dim = cfg.word_embed_proj_dim or cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, proj_dim)
        self.embed_positions = nn.Embedding(cfg.max_position + _POSITION_OFFSET, cfg.hidden_size)
        if proj_dim != cfg.hidden_size:
            self.project_in = nn.Linear(proj_dim, cfg.hidden_size, bias=False)
            self.project_out = nn.Linear(cfg.hidden_size, proj_dim, bias=False)
        if cfg.final_layer_norm:
            affine = cfg.layer_norm_affine
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine, bias=affine)
        self.layers = nn.ModuleList(OPTLayer(cfg) for _ in range(cfg.num_layers))


class OPTBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg)


class OPTModel(DecoderModel):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = OPTBackbone(cfg)
        proj_dim = cfg.word_embed_proj_dim or cfg.hidden_size
        self.lm_head = nn.Linear(proj_dim, cfg.vocab_size, bias=False)

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.model.decoder.layers)  # type: ignore[arg-type]

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        tokens = decoder.embed_tokens(input_ids)
        if hasattr(decoder, "project_in"):
            tokens = decoder.project_in(tokens)
        return tokens + decoder.embed_positions(positions + _POSITION_OFFSET)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        decoder = self.model.decoder
        if hasattr(decoder, "final_layer_norm"):
            hidden = decoder.final_layer_norm(hidden)
        if hasattr(decoder, "project_out"):
            hidden = decoder.project_out(hidden)
        return self.lm_head(hidden)

    def tied_parameters(self) -> dict[str, str]:
        return {"lm_head.weight": "model.decoder.embed_tokens.weight"} if self.config.tie_word_embeddings else {}
