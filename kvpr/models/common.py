"""Math shared by every family: RMSNorm, rotary embeddings, attention over assembled K,V."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvpr.config import RopeConfig

# Backends for attention with an explicit mask, in order of preference (see ``attend``).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like the reference implementation."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [d/2] in fp32, with linear or Llama 3 scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.scaling_type == "linear":
        return inv_freq / rope.factor
    if rope.scaling_type == "llama3":
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, 1, d], broadcastable over heads."""
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., d/2]
    angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # [..., 1, d]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [..., heads, d] by the angles in cos/sin [..., 1, d]; into ``out`` when given (x
    itself may be ``out``: the sum is written after both products are made)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.add(x * cos, rotated * sin, out=out)


def linear_into(x: torch.Tensor, linear: nn.Linear, out: torch.Tensor) -> None:
    """``out = x W^T + b`` written in place: x [rows, in], out [rows, out] (a contiguous view)."""
    bias, weight = linear.bias, linear.weight  # each a module lookup: read once
    if bias is not None:
        torch.addmm(bias, x, weight.t(), out=out)
    else:
        torch.mm(x, weight.t(), out=out)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [b, 1, q, S] as the additive bias attention adds to its scores (0 or -inf).

    Made once per decode step instead of by every layer's attention (two kernels and their launches
    each); rows are padded to 16 elements so the memory-efficient kernel reads the bias in place.
    """
    *lead, keys = mask.shape
    padded = torch.zeros(*lead, -(-keys // 16) * 16, dtype=dtype, device=mask.device)
    return padded[..., :keys].masked_fill_(~mask, float("-inf"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention of q over assembled K,V (GQA aware).

    Args:
        q: [b, n_q, q, d] queries.
        k, v: [b, n_kv, S, d] keys and values, any strides with the last dim contiguous.
        mask: [b, 1, q, S] bool, True where a query may attend a key, or ``attention_bias`` of one.
    Returns:
        [b, q, n_q * d]

    For one new token the ``n_q / n_kv`` query heads of a group are folded into the query axis,
    so grouped K,V are read once and never repeated. cuDNN's kernel is excluded: it builds a new
    plan for every context length, which costs milliseconds of CPU per call in a decode loop.
    """
    b, n_q, q_len, d = q.shape
    n_kv, group = k.shape[1], n_q // k.shape[1]
    with sdpa_kernel(ATTENTION_BACKENDS):
        if q_len == 1:
            folded = q.reshape(b, n_kv, group, d)  # [b, n_kv, g, d]: the group's queries as rows
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask)  # [b, n_kv, g, d]
            return out.reshape(b, 1, n_q * d)
        if group > 1:
            k = k.repeat_interleave(group, dim=1)  # [b, n_q, S, d]
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [b, n_q, q, d]
    return out.transpose(1, 2).reshape(b, q_len, n_q * d)
