"""Decode attention over a cache held in pieces, merged exactly (the flash-decoding merge).

A decode step's cache lies in several places: tokens resident on the GPU, chunks recomputed from
X, chunks copied over PCIe. Each piece is attended where it lies as soon as it exists and gives a
partial output with its log-sum-exp; the partials then merge into exactly the attention over the
concatenation (DESIGN.md section 7)::

    lse = logsumexp_i(lse_i)        o = sum_i exp(lse_i - lse) * o_i

So attention pipelines with the copies and no piece is ever copied into a full-length buffer.
On CUDA each piece runs one fused Triton kernel that reads token-major K,V in place and splits
long pieces over several programs (each split is one more partial); elsewhere, or without Triton,
the same arithmetic runs in float32 torch ops (the oracle the kernel is tested against).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import Any

import torch

# Programs a CUDA piece should spread over (a few waves of an H100/H200's 132 SMs).
_TARGET_PROGRAMS = 256
_BLOCK_T = 64  # tokens per inner iteration of the kernel


def triton_available(device: torch.device) -> bool:
    """A CUDA device and Triton to build the kernel with."""
    return device.type == "cuda" and _triton_installed()


def fused_decode(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode attention should run the split-KV kernel even over one piece: SDPA's kernels
    give one program per (row, KV head) at one query per row, too few to read a long context at HBM
    speed (llama-3.1-8b 4 x 32K: 32 programs), where the kernel also splits the context."""
    return triton_available(device) and dtype in (torch.float16, torch.bfloat16)


def attend_resident(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, partials: Partials
) -> torch.Tensor:
    """One new query per row over one token-major piece, split and merged: q [b, n_q, 1, d],
    k, v [t, b, n_kv, d], valid bool [b, t] -> [b, 1, n_q * d] in q's dtype (``fused_decode`` only)."""
    partials.reset()
    attend_piece(q[:, :, 0].contiguous(), k, v, valid, partials)
    return partials.merge(q.dtype)


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: every piece and merge of a decode step asks."""
    return importlib.util.find_spec("triton") is not None


class Partials:
    """The partial results of one layer's pieces, merged at the end, in buffers kept across layers.

    Each piece reserves rows of one float32 buffer pair (o [P, b, n_q, d], lse [P, b, n_q]) and its
    kernel writes them in place, so a piece allocates nothing and the merge concatenates nothing: a
    decode step is bound by the host's launches where the overflow is small, and every op counts.
    ``reset`` starts a layer (the merge that read the rows is queued before the next layer's
    writes, on the same stream); ``merge(dtype)`` returns the attention output [b, 1, n_q * d],
    the layout of ``kvpr.models.common.attend``.
    """

    def __init__(self) -> None:
        self._out: torch.Tensor | None = None  # [capacity, b, n_q, d] float32
        self._lse: torch.Tensor | None = None  # [capacity, b, n_q] float32
        self.count = 0

    def reset(self) -> None:
        self.count = 0

    @property
    def out(self) -> torch.Tensor:
        assert self._out is not None, "no piece was attended"
        return self._out[: self.count]

    @property
    def lse(self) -> torch.Tensor:
        assert self._lse is not None, "no piece was attended"
        return self._lse[: self.count]

    def reserve(self, splits: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``splits`` rows, o [splits, b, n_q, d] and lse [splits, b, n_q], for a piece of
        queries ``like`` [b, n_q, d]; the buffers grow (keeping the rows so far) when they are full."""
        shape = tuple(like.shape)
        buffers = self._out
        if buffers is None or buffers.shape[1:] != shape or buffers.device != like.device:
            self._grow(max(8, splits), like, keep=False)
        elif self.count + splits > buffers.shape[0]:
            self._grow(max(2 * buffers.shape[0], self.count + splits), like, keep=True)
        assert self._out is not None and self._lse is not None
        rows = slice(self.count, self.count + splits)
        self.count += splits
        return self._out[rows], self._lse[rows]

    def _grow(self, capacity: int, like: torch.Tensor, keep: bool) -> None:
        out = torch.empty(capacity, *like.shape, dtype=torch.float32, device=like.device)
        lse = torch.empty(capacity, *like.shape[:2], dtype=torch.float32, device=like.device)
        if keep and self.count:
            out[: self.count] = self.out
            lse[: self.count] = self.lse
        else:
            self.count = 0
        self._out, self._lse = out, lse

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Partials computed elsewhere: o [S, b, n_q, d] and lse [S, b, n_q]."""
        out_rows, lse_rows = self.reserve(out.shape[0], out[0])
        out_rows.copy_(out)
        lse_rows.copy_(lse)

    def merge(self, dtype: torch.dtype) -> torch.Tensor:
        out, lse = self.out, self.lse
        b, n_q, d = out.shape[1:]
        if triton_available(out.device) and out.is_contiguous() and lse.is_contiguous():
            return _merge_triton(out, lse, dtype).reshape(b, 1, n_q * d)
        return merge_partials(out, lse).to(dtype).reshape(b, 1, n_q * d)


def merge_partials(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Exact merge: out [P, b, n_q, d] and lse [P, b, n_q] (float32) -> [b, n_q, d] float32.

    A partial over no attended token has lse = -inf and weighs nothing.
    """
    total = torch.logsumexp(lse, dim=0)  # [b, n_q]
    weights = torch.exp(lse - total)  # [P, b, n_q]
    return torch.einsum("pbh,pbhd->bhd", weights, out)


def attend_piece(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, partials: Partials
) -> None:
    """Attend one new query per row over one piece of the cache; add its partial(s) to ``partials``.

    Args:
        q: [b, n_q, d] queries of the new token (scaled by 1/sqrt(d) here, as SDPA does).
        k, v: [t, b, n_kv, d] token-major keys and values, any strides with the last dim contiguous
            (a view of a tier, a ring slot or a recompute buffer); GQA when n_q > n_kv.
        valid: bool [b, t], True where a row attends the token (None: every token).
    """
    if k.shape[0] == 0:
        return
    if triton_available(q.device) and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype:
        _attend_triton(q, k, v, valid, partials)
    else:
        partials.add(*_attend_torch(q, k, v, valid))


def _attend_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 reference: one partial, o [1, b, n_q, d] and lse [1, b, n_q]."""
    b, n_q, d = q.shape
    n_kv = k.shape[2]
    qg = q.float().reshape(b, n_kv, n_q // n_kv, d)  # [b, n_kv, g, d]
    keys = k.float().permute(1, 2, 3, 0)  # [b, n_kv, d, t]
    values = v.float().permute(1, 2, 0, 3)  # [b, n_kv, t, d]
    scores = torch.matmul(qg, keys) * (1.0 / math.sqrt(d))  # [b, n_kv, g, t]
    if valid is not None:  # a token no row attends contributes nothing, whatever its bytes (as in the kernel)
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        values = values.masked_fill(~valid[:, None, :, None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)  # [b, n_kv, g]
    probs = torch.exp(scores - lse.unsqueeze(-1)).nan_to_num(0.0)  # a fully masked row: -inf lse, zero weight
    out = torch.matmul(probs, values)  # [b, n_kv, g, d]
    return out.reshape(1, b, n_q, d), lse.reshape(1, b, n_q)


@functools.cache
def _decode_kernel() -> Any:
    """The Triton kernel, built on first use (Triton is imported only where it is used).

    One program attends the ``g`` query heads of one KV head of one row over one split of the
    piece's tokens, reading K and V token-major in place, with an online softmax in float32.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def decode_partial(
        q_ptr, k_ptr, v_ptr, valid_ptr, o_ptr, lse_ptr,
        t, n_kv, group, head_dim, tokens_per_split, scale,
        stride_qb, stride_qh,
        stride_kt, stride_kb, stride_kh,
        stride_vt, stride_vb, stride_vh,
        stride_mb, stride_mt,
        stride_os, stride_ob, stride_oh,
        stride_ls, stride_lb,
        HAS_VALID: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    ):  # fmt: skip
        row_head = tl.program_id(0)
        split = tl.program_id(1)
        row = row_head // n_kv
        kv_head = row_head % n_kv
        heads = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        head_ok = heads < group
        dim_ok = dims < head_dim
        q_heads = kv_head * group + heads
        q = tl.load(
            q_ptr + row * stride_qb + q_heads[:, None] * stride_qh + dims[None, :],
            mask=head_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )  # [G, D]
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, t)
        m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        k_base = k_ptr + row * stride_kb + kv_head * stride_kh
        v_base = v_ptr + row * stride_vb + kv_head * stride_vh
        for block in range(start, end, BLOCK_T):
            tokens = block + tl.arange(0, BLOCK_T)
            token_ok = tokens < end
            if HAS_VALID:
                token_ok &= tl.load(valid_ptr + row * stride_mb + tokens * stride_mt, mask=token_ok, other=0) != 0
            kv_mask = token_ok[:, None] & dim_ok[None, :]
            keys = tl.load(k_base + tokens[:, None] * stride_kt + dims[None, :], mask=kv_mask, other=0.0)  # [T, D]
            scores = tl.dot(q, tl.trans(keys)).to(tl.float32) * scale  # [G, T]
            scores = tl.where(token_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(scores - m_safe[:, None])
            values = tl.load(v_base + tokens[:, None] * stride_vt + dims[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values).to(tl.float32)
            s = s * alpha + tl.sum(p, axis=1)
            m = m_new
        has_any = s > 0
        out = acc / tl.where(has_any, s, 1.0)[:, None]
        lse = tl.where(has_any, m + tl.log(tl.where(has_any, s, 1.0)), float("-inf"))
        o_offsets = split * stride_os + row * stride_ob + q_heads[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptr + o_offsets, out, mask=head_ok[:, None] & dim_ok[None, :])
        tl.store(lse_ptr + split * stride_ls + row * stride_lb + q_heads, lse, mask=head_ok)

    return decode_partial


def _attend_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, partials: Partials
) -> None:
    """The fused kernel: S partials written into the next S rows of ``partials``."""
    b, n_q, d = q.shape
    t, _, n_kv, _ = k.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dims must be contiguous"
    group = n_q // n_kv
    programs = b * n_kv
    splits = max(1, min(-(-_TARGET_PROGRAMS // programs), -(-t // _BLOCK_T)))
    tokens_per_split = -(-t // splits)
    tokens_per_split = -(-tokens_per_split // _BLOCK_T) * _BLOCK_T
    splits = -(-t // tokens_per_split)
    out, lse = partials.reserve(splits, q)  # [S, b, n_q, d], [S, b, n_q]
    mask = valid if valid is not None else q  # any tensor; unread when HAS_VALID is False
    mask_strides = (valid.stride(0), valid.stride(1)) if valid is not None else (0, 0)
    if valid is not None and valid.dtype == torch.bool:
        mask = valid.view(torch.uint8)
    _decode_kernel()[(programs, splits)](
        q, k, v, mask, out, lse,
        t, n_kv, group, d, tokens_per_split, 1.0 / math.sqrt(d),
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *mask_strides,
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        HAS_VALID=valid is not None,
        BLOCK_G=max(16, triton_next_power_of_2(group)),
        BLOCK_D=max(16, triton_next_power_of_2(d)),
        BLOCK_T=_BLOCK_T,
    )  # fmt: skip


@functools.cache
def _merge_kernel() -> Any:
    """The merge as one Triton kernel (the torch form is a dozen launches a layer): one program per
    (row, query head) runs an online log-sum-exp over the P partials and writes the output dtype."""
    import triton
    import triton.language as tl

    @triton.jit
    def merge_partials_kernel(
        o_ptr, lse_ptr, out_ptr, num_partials, rows_heads, head_dim,
        BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row_head = tl.program_id(0)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < head_dim
        m = tl.full([BLOCK_D], float("-inf"), dtype=tl.float32)  # per dim (all equal): loop-carried types stay fixed
        s = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for p in range(num_partials):
            lse = tl.load(lse_ptr + p * rows_heads + row_head)
            o = tl.load(o_ptr + (p * rows_heads + row_head) * head_dim + dims, mask=dim_ok, other=0.0)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            weight = tl.exp(lse - m_safe)
            acc = acc * alpha + weight * o
            s = s * alpha + weight
            m = m_new
        merged = acc / tl.where(s > 0, s, 1.0)
        tl.store(out_ptr + row_head * head_dim + dims, merged.to(out_ptr.dtype.element_ty), mask=dim_ok)

    return merge_partials_kernel


def _merge_triton(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``merge_partials`` in one launch, cast to ``dtype``: out [P, b, n_q, d], lse [P, b, n_q]
    (contiguous float32) -> [b, n_q, d]. A row no partial attends gives zeros (torch: NaN)."""
    num_partials, b, n_q, d = out.shape
    merged = torch.empty(b, n_q, d, dtype=dtype, device=out.device)
    _merge_kernel()[(b * n_q,)](out, lse, merged, num_partials, b * n_q, d, BLOCK_D=max(16, triton_next_power_of_2(d)))
    return merged


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
