"""KVO's batched prefill against the per-block computations it replaced (kept here as oracles only)."""

from __future__ import annotations

import math

import pytest
import torch

from kvpr.compress.kvo import KVOConfig, encode_chunks
from kvpr.runtime.layer_caches import received_attention


def received_attention_oracle(q: torch.Tensor, k: torch.Tensor, valid: torch.Tensor, window: int) -> torch.Tensor:
    """The former implementation: full softmax per block of queries, masks of every key."""
    b, n_q, t, d = q.shape
    n_kv = k.shape[1]
    qg = q.reshape(b, n_kv, n_q // n_kv, t, d)
    scores = torch.zeros(b, n_kv, t, dtype=torch.float32, device=q.device)
    keys = torch.arange(t, device=q.device)
    block = max(16, min(256, (1 << 27) // max(1, b * n_q * t)))
    for start in range(0, t, block):
        end = min(t, start + block)
        queries = keys[start:end, None]  # [B, 1]
        logits = torch.matmul(qg[:, :, :, start:end].float(), k[:, :, None, :end].float().transpose(-1, -2))
        logits = logits * (1.0 / math.sqrt(d))  # [b, n_kv, g, B, end]
        allowed = ((keys[:end] <= queries) & valid[:, None, :end]) | (keys[:end] == queries)  # [b, B, end]
        probs = torch.softmax(logits.masked_fill(~allowed[:, None, None], float("-inf")), dim=-1)
        band = (keys[:end] < queries) & (queries <= keys[:end] + window)  # [B, end]
        counted = band & valid[:, start:end, None]  # [b, B, end]
        scores[:, :, :end] += (probs * counted[:, None, None]).sum(dim=(2, 3))
    return scores.permute(2, 0, 1)


def _qkv(b: int, n_q: int, n_kv: int, t: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(b, n_q, t, d, generator=gen)).to(dtype)
    k = (2 * torch.randn(b, n_kv, t, d, generator=gen)).to(dtype)
    return q, k


@pytest.mark.parametrize(
    ("b", "n_q", "n_kv", "t", "d", "window"),
    [(2, 4, 4, 300, 32, 128), (3, 8, 2, 517, 64, 128), (1, 2, 1, 40, 32, 7), (2, 4, 2, 96, 32, 1000)],
)
def test_received_attention_equals_the_per_block_softmax(b, n_q, n_kv, t, d, window) -> None:
    q, k = _qkv(b, n_q, n_kv, t, d, seed=t)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, : t // 5] = False  # left padding in the first row
    got = received_attention(q, k, valid, window)
    want = received_attention_oracle(q, k, valid, window)
    assert got.shape == (t, b, n_kv)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[: t // 5, 0] == 0).all()  # padding receives nothing


def test_received_attention_of_fp16_inputs() -> None:
    q, k = _qkv(2, 4, 2, 200, 64, seed=3, dtype=torch.float16)
    valid = torch.ones(2, 200, dtype=torch.bool)
    torch.testing.assert_close(
        received_attention(q, k, valid, 128), received_attention_oracle(q, k, valid, 128), rtol=1e-5, atol=1e-6
    )


def test_scores_give_the_same_encoding() -> None:
    """The new scores reorder the chunks exactly as the old ones: the encoded tensors are equal."""
    b, n_kv, t, d = 2, 2, 512, 64
    q, k = _qkv(b, 2 * n_kv, n_kv, t, d, seed=11)
    v = torch.randn(t, b, n_kv, d, generator=torch.Generator().manual_seed(12))
    valid = torch.ones(b, t, dtype=torch.bool)
    cfg, kt = KVOConfig(), k.permute(2, 0, 1, 3)  # [t, b, n_kv, d]
    got = encode_chunks(kt, v, received_attention(q, k, valid, 128), cfg)
    want = encode_chunks(kt, v, received_attention_oracle(q, k, valid, 128), cfg)
    for name in want:
        assert torch.equal(got[name], want[name]), name
