"""Per-layer caches of the compressed executor: the contract, the shared attention, dense and KIVI.

A layer cache owns one layer's K,V in whatever form its method keeps them and answers one decode
step: it takes the new token's q, k, v, stores the token, reads what the method reads, and attends.
Prefill attention is dense and exact (the executor runs it); the cache only stores the prompt,
with the attention each prompt token received when the method ranks tokens by it.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from kvpr.cache.codec import EncodedKV
from kvpr.cache.rows import GatherStaging, RowLayout, RowTier
from kvpr.cache.storage import CacheShape
from kvpr.compress.methods import KiviConfig
from kvpr.models.common import ATTENTION_BACKENDS, attend
from kvpr.runtime.split_attention import Partials, attend_resident, fused_decode


class LayerCache(Protocol):
    """One layer's cache under a method (see the module docstring).

    Contract:
        prefill_queries: None when the method needs no scores; else how many following queries'
            attention a prompt token's score sums (the executor computes it, see ``received_attention``).
        prefill(k, v, valid, scores): k, v [t, b, n_kv, d] (RoPE applied), valid bool [t, b] (False:
            left padding, never attended), scores float32 [t, b, n_kv] or None. Called once, first.
        decode(q, k, v) -> [b, n_q * d]: q [b, n_q, d], k, v [b, n_kv, d] of the new token.
        nbytes() -> int: bytes held now (codes, scales, masks, bookkeeping).
        read_bytes: bytes the last decode step read from the cache (all tiers).
        link_bytes: of those, bytes copied from host memory.
    """

    prefill_queries: int | None
    read_bytes: int
    link_bytes: int

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None: ...

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, need_probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One query per row over per-head K,V (GQA: the query heads of a KV head share its tokens).

    Args:
        q: [b, n_q, d]. k, v: [b, n_kv, S, d]. mask: bool [b, n_kv or 1, S], True where attended.
        need_probs: also return the probabilities (computed in float32, not by a fused kernel).
    Returns:
        out [b, n_q * d] and probs float32 [b, n_kv, n_q / n_kv, S] (or None).
    """
    b, n_q, d = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(b, n_kv, n_q // n_kv, d)  # [b, n_kv, g, d]
    if not need_probs:
        with sdpa_kernel(ATTENTION_BACKENDS):
            out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, :, None, :])  # [b, n_kv, g, d]
        return out.reshape(b, n_q * d), None
    logits = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(d))  # [b, n_kv, g, S]
    probs = torch.softmax(logits.masked_fill(~mask[:, :, None, :], float("-inf")), dim=-1)
    out = torch.matmul(probs.to(v.dtype), v)  # [b, n_kv, g, d]
    return out.reshape(b, n_q * d), probs


def received_attention(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """Attention each prompt token receives from the next ``window`` (real) queries of the prompt.

    Args:
        q: [b, n_q, t, d], k: [b, n_kv, t, d] (RoPE applied), valid: bool [b, t].
    Returns:
        float32 [t, b, n_kv]: for token j, the sum over queries i in (j, j + window] and over the
        query heads of j's KV head of the causal attention probability p[i, j].

    Blocks of queries: each block's logits over the keys it sees give its rows' log-sum-exp (one
    batched GEMM with the padding bias folded in, four in-place passes), and only the band of keys
    within ``window`` of the block is exponentiated and summed, so no [t, t] probabilities exist
    and nothing waits on the host. A padding query's row may be all -inf: it is never counted.
    """
    b, n_q, t, d = q.shape
    n_kv = k.shape[1]
    g, rows = n_q // n_kv, b * n_kv
    qg = q.reshape(b, n_kv, g, t, d)
    keys = k.float().reshape(rows, t, d)  # [b * n_kv, t, d]
    # padding keys are never attended; [b * n_kv, 1, t], broadcast over the block's queries
    bias = torch.zeros(b, t, device=q.device).masked_fill_(~valid, float("-inf"))
    bias = bias[:, None, None, :].expand(b, n_kv, 1, t).reshape(rows, 1, t)
    positions = torch.arange(t, device=q.device)
    scores = torch.zeros(b, n_kv, t, dtype=torch.float32, device=q.device)
    block = max(16, min(256, (1 << 27) // max(1, b * n_q * t)))  # at most ~512 MB of logits
    for start in range(0, t, block):
        end = min(t, start + block)
        lo = max(0, start - window)  # the first key a query of the block counts
        size = end - start
        queries = qg[:, :, :, start:end].float().reshape(rows, g * size, d)
        logits = torch.baddbmm(bias[:, :, :end], queries, keys[:, :end].transpose(1, 2), alpha=1.0 / math.sqrt(d))
        logits5 = logits.view(b, n_kv, g, size, end)  # [b, n_kv, g, B, end]
        future = positions[start:end, None] < positions[None, start:end]  # [B, B]: key after query
        logits5[..., start:end].masked_fill_(future, float("-inf"))
        band = logits5[..., lo:end].clone()  # [b, n_kv, g, B, width]
        peak = logits.amax(dim=-1, keepdim=True)  # [rows, g * B, 1]
        total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)
        lse = (total.log_() + peak).view(b, n_kv, g, size, 1)
        query = positions[start:end, None]  # [B, 1]
        key = positions[None, lo:end]  # [1, width]
        counted = (key < query) & (query <= key + window) & valid[:, start:end, None]  # [b, B, width]
        probs = band.sub_(lse).exp_().masked_fill_(~counted[:, None, None], 0.0)
        scores[:, :, lo:end] += probs.sum(dim=(2, 3))
    return scores.permute(2, 0, 1)


class DenseCache:
    """An uncompressed layer (KVO's and Quest's first layers): every token, on the compute device,
    attended densely exactly as the uncompressed runtime does."""

    prefill_queries: int | None = None

    def __init__(self, shape: CacheShape, device: torch.device) -> None:
        size = (shape.max_len, shape.batch_size, shape.num_kv_heads, shape.head_dim)
        self.k = torch.empty(size, dtype=shape.dtype, device=device)  # [s_max, b, n_kv, d]
        self.v = torch.empty(size, dtype=shape.dtype, device=device)
        self.valid = torch.zeros(shape.batch_size, shape.max_len, dtype=torch.bool, device=device)  # [b, s_max]
        self.length = 0
        self.read_bytes = self.link_bytes = 0
        self.partials = Partials() if fused_decode(device, shape.dtype) else None  # the split-KV kernel on CUDA

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None:
        t = k.shape[0]
        self.k[:t], self.v[:t] = k, v
        self.valid[:, :t] = valid.T
        self.length = t

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        slot = self.length
        self.k[slot], self.v[slot] = k, v
        self.valid[:, slot] = True
        self.length += 1
        keys, values = self.k[: slot + 1], self.v[: slot + 1]  # [s+1, b, n_kv, d]
        self.read_bytes = 2 * keys.numel() * keys.element_size()
        if self.partials is not None:
            out = attend_resident(q.unsqueeze(2), keys, values, self.valid[:, : slot + 1], self.partials)
        else:
            mask = self.valid[:, None, None, : slot + 1]  # [b, 1, 1, s+1]
            out = attend(q.unsqueeze(2), keys.permute(1, 2, 0, 3), values.permute(1, 2, 0, 3), mask)
        return out[:, 0]  # [b, n_q*d]

    def nbytes(self) -> int:
        return 2 * self.length * self.k[0].numel() * self.k.element_size()


class KiviCache:
    """KIVI at 2, 3 or 4 bits (``config.codec()``: the spec's width, groups and rotation): blocks of
    ``token_group`` tokens quantised (K per channel, V per token; Hadamard-rotated first where
    ``rotate`` says, un-rotated by the codec's decode), packed one row per (block, sequence, head) on
    the device or the host; the newest tokens in an fp16 residual on the device until ``residual`` of
    them are quantised together. Every step reads every block.
    """

    prefill_queries: int | None = None

    def __init__(
        self,
        config: KiviConfig,
        shape: CacheShape,
        device: torch.device,
        on_host: bool,
        pin: bool,
        staging: GatherStaging | None = None,
    ) -> None:
        self.config, self.device, self.dtype = config, device, shape.dtype
        self.codec = config.codec()  # bits, groups and rotation as the method's spec says
        b, n, d = shape.batch_size, shape.num_kv_heads, shape.head_dim
        self.b, self.n, self.d = b, n, d
        probe = torch.zeros(config.token_group, 1, 1, d)
        self.layout = RowLayout.of(self._to_rows(self.codec.encode(probe, probe)), _KIVI_PARTS, lead=3)
        capacity = -(-shape.max_len // config.token_group)
        self.tier = RowTier(capacity, (b, n), self.layout.row_bytes, device, on_host, pin, staging, "kivi")
        size = (config.residual, b, n, d)
        self.res_k = torch.zeros(size, dtype=torch.float16, device=device)  # [R, b, n_kv, d]
        self.res_v = torch.zeros(size, dtype=torch.float16, device=device)
        self.res_len = 0
        self.valid = torch.zeros(b, shape.max_len, dtype=torch.bool, device=device)  # [b, s_max]
        self.length = 0
        self.read_bytes = self.link_bytes = 0

    def _to_rows(self, enc: EncodedKV) -> dict[str, torch.Tensor]:
        """The codec's token-major tensors -> per-block tensors [nb, b, n_kv, ...]."""
        ts = dict(enc.tensors)
        T = self.config.token_group
        for name in ("k_codes", "v_codes", "v_scale", "v_zero"):
            x = ts[name]  # [nb*T, b, n_kv, X]
            ts[name] = x.reshape(-1, T, *x.shape[1:]).permute(0, 2, 3, 1, 4)  # [nb, b, n_kv, T, X]
        return {name: ts[name].contiguous() for name in _KIVI_PARTS}

    def _from_rows(self, parts: dict[str, torch.Tensor]) -> EncodedKV:
        nb = parts["k_scale"].shape[0]
        ts = dict(parts)
        for name in ("k_codes", "v_codes", "v_scale", "v_zero"):
            x = parts[name]  # [nb, b, n_kv, T, X]
            ts[name] = x.permute(0, 3, 1, 2, 4).reshape(-1, *x.shape[1:3], x.shape[-1])  # [nb*T, b, n_kv, X]
        empty = self.res_k[:0]
        ts |= {"k_residual": empty, "v_residual": empty}
        return EncodedKV(self.codec.name, (nb * self.config.token_group, self.b, self.n, self.d), ts)

    def _append(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Add [t, b, n_kv, d] tokens; quantise the residual each time it holds ``residual`` tokens."""
        t, R = k.shape[0], self.config.residual
        self.valid[:, self.length : self.length + t] = valid.T
        self.length += t
        keep = valid[:, :, None, None]
        k = torch.where(keep, k, torch.zeros_like(k)).to(torch.float16)  # padding never widens a range
        v = torch.where(keep, v, torch.zeros_like(v)).to(torch.float16)
        total = self.res_len + t
        if total < R:
            self.res_k[self.res_len : total], self.res_v[self.res_len : total] = k, v
            self.res_len = total
            return
        all_k = torch.cat([self.res_k[: self.res_len], k])  # [total, b, n_kv, d]
        all_v = torch.cat([self.res_v[: self.res_len], v])
        full = total // R * R
        rows = self.layout.pack(self._to_rows(self.codec.encode(all_k[:full], all_v[:full])), lead=3)
        self.tier.write(rows)  # [full / T, b, n_kv, row_bytes]
        self.res_len = total - full
        self.res_k[: self.res_len], self.res_v[: self.res_len] = all_k[full:], all_v[full:]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None:
        self._append(k, v, valid)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self._append(k[None], v[None], torch.ones(1, self.b, dtype=torch.bool, device=self.device))
        rows = self.tier.read(0, self.tier.length)  # [nb, b, n_kv, row_bytes]
        k_old, v_old = self.codec.decode(self._from_rows(self.layout.unpack(rows)), self.dtype)  # [nb*T, b, n, d]
        keys = torch.cat([k_old, self.res_k[: self.res_len].to(self.dtype)]).permute(1, 2, 0, 3)  # [b, n_kv, s, d]
        values = torch.cat([v_old, self.res_v[: self.res_len].to(self.dtype)]).permute(1, 2, 0, 3)
        self.link_bytes = rows.numel() if self.tier.on_host else 0
        self.read_bytes = rows.numel() + 2 * self.res_len * self.b * self.n * self.d * 2
        out, _ = decode_attention(q, keys, values, self.valid[:, None, : self.length])
        return out

    def nbytes(self) -> int:
        return self.tier.nbytes() + 2 * self.res_len * self.b * self.n * self.d * 2

    def host_nbytes(self) -> int:
        """Host memory of the block rows (allocated for every slot); 0 when they are on the device."""
        return self.tier.host_nbytes()

    @staticmethod
    def bytes_per_token(config: KiviConfig, n_kv: int, d: int) -> float:
        """Stored (and read) bytes of one token of one layer in steady state, for one sequence."""
        return config.codec().bytes_per_token(1, n_kv, d)


_KIVI_PARTS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
