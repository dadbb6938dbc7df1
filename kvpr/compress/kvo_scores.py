"""The attention each prompt token receives, for KVO's in-chunk order, at the cost of a band.

A prompt token's score is the probability mass the next ``window`` queries give it. The softmax
normaliser of every query (its log-sum-exp) comes out of the prefill's own attention kernel, so
only the band of logits ``key < query <= key + window`` is computed again: one batched GEMM over
blocks of keys, each against the queries of its block and the next ones, in float32.
``kvpr.runtime.layer_caches.received_attention`` (every query's full row) is the reference.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kvpr.models.common import ATTENTION_BACKENDS, attend, attention_bias

KEY_BLOCK = 64  # keys per block of the band: queries of ceil(window / 64) + 1 blocks are computed
MAX_BAND_ELEMENTS = 1 << 27  # float32 query windows and band logits per pass (512 MB)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` (same kernel, same output) that also returns each query's log-sum-exp.

    Args:
        q: [b, n_q, q, d]; k, v: [b, n_kv, q, d] (a prefill from an empty cache); mask: bool
            [b, 1, q, q], True where a query may attend a key.
    Returns:
        out [b, q, n_q * d] as ``kvpr.models.common.attend`` gives it, and float32 lse [b, n_q, q]
        of the scaled logits over each query's allowed keys.

    The kernel ``attend`` dispatches to (memory-efficient on CUDA, flash on the CPU) is called
    directly with its log-sum-exp output on; any other backend runs ``attend`` and a blocked
    float32 log-sum-exp (:func:`blocked_lse`).
    """
    b, n_q, q_len, d = q.shape
    group = n_q // k.shape[1]
    kr, vr = k, v
    if group > 1:  # as ``attend`` does for a prompt
        kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [b, n_q, q, d]
    with sdpa_kernel(ATTENTION_BACKENDS):
        choice = torch._fused_sdp_choice(q, kr, vr, attn_mask=mask)  # the backend ``attend`` gets
    fused = (q.is_cuda and choice == SDPBackend.EFFICIENT_ATTENTION.value) or (
        q.device.type == "cpu" and choice == SDPBackend.FLASH_ATTENTION.value
    )
    if not fused:
        return attend(q, k, v, mask), blocked_lse(q, k, mask)
    k, v = kr, vr
    bias = attention_bias(mask, q.dtype)  # [b, 1, q, q]: the float bias sdpa makes of a bool mask
    if q.is_cuda:
        bias = bias.expand(b, n_q, q_len, k.shape[2])  # as sdpa hands it to the kernel
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    return out.transpose(1, 2).reshape(b, q_len, n_q * d), lse[..., :q_len].float()  # lse padded on CUDA


def blocked_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 log-sum-exp [b, n_q, q] of each query's scaled logits over its allowed keys, in
    blocks of queries (the fallback when no fused kernel gives it)."""
    b, n_q, q_len, d = q.shape
    n_kv = k.shape[1]
    keys = k.float().transpose(-1, -2)  # [b, n_kv, d, S]
    lse = torch.empty(b, n_kv, n_q // n_kv, q_len, device=q.device)
    block = max(16, min(q_len, MAX_BAND_ELEMENTS // max(1, b * n_q * k.shape[2])))
    for start in range(0, q_len, block):
        end = min(q_len, start + block)
        rows = q[:, :, start:end].float().reshape(b, n_kv, n_q // n_kv, end - start, d)  # [b, n_kv, g, B, d]
        logits = torch.matmul(rows, keys[:, :, None]) * (1.0 / math.sqrt(d))  # [b, n_kv, g, B, S]
        logits.masked_fill_(~mask[:, :, None, start:end], float("-inf"))
        lse[..., start:end] = logits.logsumexp(dim=-1)
    return lse.reshape(b, n_q, q_len)


def band_scores(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, lse: torch.Tensor, window: int) -> torch.Tensor:
    """Attention each prompt token receives from the next ``window`` real queries, given every
    query's log-sum-exp: ``received_attention`` without recomputing whole rows.

    Args:
        q: [b, n_q, t, d], k: [b, n_kv, t, d] (RoPE applied), valid: bool [b, t], lse: float32
            [b, n_q, t] (:func:`prefill_attention`), window: queries counted after each key.
    Returns:
        float32 [t, b, n_kv]: for key j, the sum over real queries i in (j, j + window] and over
        the query heads of j's KV head of ``exp(q_i . k_j / sqrt(d) - lse_i)``; 0 for padding keys.

    Keys in blocks of ``B``; block ``c`` (keys ``[cB, (c+1)B)``) meets the ``R * B`` queries from
    ``cB`` on (``R = ceil(window / B) + 1`` blocks), which hold every query its keys count. The
    query windows are strided views of the padded queries, so all blocks are one batched GEMM
    (float32 accumulation) and a few element-wise passes; passes of several blocks bound memory.
    """
    b, n_q, t, d = q.shape
    n_kv = k.shape[1]
    g = n_q // n_kv
    window = min(window, t - 1)  # no query lies further than t - 1 tokens after a key
    scores = torch.zeros(b, n_kv, t, dtype=torch.float32, device=q.device)
    if window <= 0:
        return scores.permute(2, 0, 1)
    B = min(KEY_BLOCK, window)
    R = -(-window // B) + 1  # query blocks a key block meets
    nb = -(-t // B)  # key blocks
    span = (nb + R - 1) * B  # padded query length: the last key block's queries run past t
    # [b, n_kv, g, span, d]: queries padded with zeros (never counted), lse with zeros (finite);
    # q and k stay in their dtype here, each pass widens its own windows
    qp = torch.zeros(b, n_kv, g, span, d, dtype=q.dtype, device=q.device)
    qp[..., :t, :] = q.reshape(b, n_kv, g, t, d)
    lp = torch.zeros(b, n_kv, g, span, dtype=torch.float32, device=q.device)
    lp[..., :t] = lse.reshape(b, n_kv, g, t)
    kp = torch.zeros(b, n_kv, nb * B, d, dtype=k.dtype, device=q.device)
    kp[:, :, :t] = k
    vq = torch.zeros(b, span, dtype=torch.bool, device=q.device)
    vq[:, :t] = valid
    vk = vq[:, : nb * B].reshape(b, nb, B)  # [b, nb, B]: real keys
    # Query windows, strided views: window c starts at query c*B and spans R*B queries.
    q_win = qp.as_strided((b, n_kv, nb, g, R * B, d), (*qp.stride()[:2], B * d, qp.stride(2), d, 1))
    l_win = lp.as_strided((b, n_kv, nb, g, R * B), (*lp.stride()[:2], B, lp.stride(2), 1))
    v_win = vq.as_strided((b, nb, R * B), (vq.stride(0), B, 1))  # [b, nb, R*B]: real queries
    rel_q = torch.arange(R * B, device=q.device)[:, None]  # [R*B, 1]: query offset from the block start
    rel_k = torch.arange(B, device=q.device)[None, :]  # [1, B]
    band = (rel_k < rel_q) & (rel_q <= rel_k + window)  # [R*B, B]: the same for every block
    kb = kp.view(b, n_kv, nb, B, d)
    # float32 elements a key block takes: its query windows and its logits
    per_pass = max(1, MAX_BAND_ELEMENTS // (b * n_q * R * B * (d + B)))
    for first in range(0, nb, per_pass):
        last = min(nb, first + per_pass)
        m = last - first
        rows = q_win[:, :, first:last].float().reshape(b * n_kv * m, g * R * B, d)  # one copy of the windows
        keys = kb[:, :, first:last].float().reshape(b * n_kv * m, B, d)
        logits = torch.bmm(rows, keys.transpose(1, 2)).mul_(1.0 / math.sqrt(d))  # [b*n_kv*m, g*R*B, B]
        logits = logits.view(b, n_kv, m, g, R * B, B).sub_(l_win[:, :, first:last, :, :, None])
        probs = logits.exp_()  # [b, n_kv, m, g, R*B, B]
        counted = band & v_win[:, first:last, :, None] & vk[:, first:last, None, :]  # [b, m, R*B, B]
        probs.masked_fill_(~counted[:, None, :, None], 0.0)
        scores[:, :, first * B : last * B] = probs.sum(dim=(3, 4)).reshape(b, n_kv, m * B)[..., : t - first * B]
    return scores.permute(2, 0, 1)
