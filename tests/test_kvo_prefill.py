"""KVO's batched prefill against the per-block computations it replaced (kept here as oracles only)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend

from kvpr.compress.kvo import encode_chunks, encode_recent, largest
from kvpr.compress.kvo_config import KVOConfig
from kvpr.compress.kvo_scores import band_scores, blocked_lse, prefill_attention
from kvpr.compress.packing import pack_mask
from kvpr.models.common import attend
from kvpr.runtime.batch import BatchState
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


def _fit_range_oracle(x: torch.Tensor, dim, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    zero = (lo - lo.abs() * 2.0**-10).to(torch.float16)
    scale = ((hi - zero.float()) * (1.0 / levels) * (1 + 2.0**-10)).to(torch.float16)
    return scale, zero


def _quantize_oracle(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    step = scale.float()
    step = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round((x.float() - zero.float()) / step).clamp_(0, levels).to(torch.uint8)


def _pack_oracle(codes: torch.Tensor, bits: int) -> torch.Tensor:
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    codes = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def _largest_oracle(x: torch.Tensor, count: int, dim: int) -> torch.Tensor:
    top = torch.argsort(x, dim=dim, descending=True, stable=True).narrow(dim, 0, count)
    return top.sort(dim=dim).values


def encode_chunks_oracle(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, cfg: KVOConfig) -> dict:
    """The former encode: every code quantised then the kept ones gathered, whole groups sorted."""
    t, b, n, d = k.shape
    S, G, A, P = cfg.chunk, cfg.group, cfg.chunk - 1, cfg.anchors_per_group
    C, nG, groups = t // S, t // G, d // G
    order = torch.argsort(scores.float().reshape(C, S, b, n).permute(0, 2, 3, 1), dim=-1, descending=True, stable=True)
    index = order.unsqueeze(-1).expand(C, b, n, S, d)
    kr = k.float().reshape(C, S, b, n, d).permute(0, 2, 3, 1, 4).gather(3, index)
    vr = v.float().reshape(C, S, b, n, d).permute(0, 2, 3, 1, 4).gather(3, index)
    levels = (1 << cfg.k_anchor_bits) - 1
    anchor = kr[..., 0, :].reshape(C, b, n, groups, G)
    ka_scale, ka_zero = _fit_range_oracle(anchor, -1, levels)
    ka_codes = _quantize_oracle(anchor, ka_scale, ka_zero, levels)
    ka_hat = (ka_codes.float() * ka_scale.float() + ka_zero.float()).reshape(C, b, n, d)
    diff = (kr[..., 1:, :] - ka_hat.unsqueeze(-2)).reshape(C, b, n, A, groups, G)
    levels = (1 << cfg.k_diff_bits) - 1
    kd_scale, kd_zero = _fit_range_oracle(diff, -1, levels)
    kd_codes = _quantize_oracle(diff, kd_scale, kd_zero, levels)
    kept = _largest_oracle(diff.abs(), cfg.k_keep, dim=-1)
    k_keep = torch.zeros_like(diff, dtype=torch.bool).scatter_(-1, kept, True)
    vg = vr.reshape(nG, P, b, n, S, d).permute(0, 2, 3, 1, 4, 5)
    levels, a_levels = (1 << cfg.v_bits) - 1, (1 << cfg.v_anchor_bits) - 1
    v_scale, v_zero = _fit_range_oracle(vg, (3, 4), levels)
    v_scale, v_zero = v_scale.squeeze(3), v_zero.squeeze(3)
    va_codes = _quantize_oracle(vg[..., 0, :], v_scale.float() * (levels / a_levels), v_zero, a_levels)
    others = vg[..., 1:, :].reshape(nG, b, n, P * A, d)
    vo_codes = _quantize_oracle(others, v_scale, v_zero, levels)
    v_kept = _largest_oracle(others.abs(), cfg.v_keep - P, dim=3)
    v_keep = torch.zeros_like(others, dtype=torch.bool).scatter_(3, v_kept, True)
    return {
        "order": _pack_oracle(order, cfg.order_bits),
        "k_anchor_codes": _pack_oracle(ka_codes.reshape(C, b, n, d), cfg.k_anchor_bits),
        "k_anchor_scale": ka_scale.squeeze(-1),
        "k_anchor_zero": ka_zero.squeeze(-1),
        "k_diff_codes": _pack_oracle(kd_codes.gather(-1, kept), cfg.k_diff_bits).flatten(-2),
        "k_diff_scale": kd_scale.squeeze(-1),
        "k_diff_zero": kd_zero.squeeze(-1),
        "k_keep": pack_mask(k_keep.flatten(-2)),
        "v_anchor_codes": _pack_oracle(va_codes, cfg.v_anchor_bits),
        "v_codes": _pack_oracle(vo_codes.gather(3, v_kept), cfg.v_bits),
        "v_keep": pack_mask(v_keep),
        "v_scale": v_scale.squeeze(-2),
        "v_zero": v_zero.squeeze(-2),
    }


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


def _ties(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Coarsely rounded values (many equal magnitudes and zeros), so tie-breaking is exercised."""
    return torch.where(torch.rand(x.shape, generator=gen) < 0.3, torch.zeros_like(x), x).mul(2).round().div(2)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encode_chunks_is_bit_identical_to_the_former_encode(ties: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    t, b, n, d = 256, 3, 2, 64
    k, v = 3 * torch.randn(t, b, n, d, generator=gen), torch.randn(t, b, n, d, generator=gen) + 0.5
    scores = torch.rand(t, b, n, generator=gen)
    if ties:
        k, v, scores = _ties(k, gen), _ties(v, gen), scores.mul(4).round()
        k[:8] = 1.0  # a constant chunk: zero scales
        scores[40:48] = float("-inf")  # a chunk of padding
    k, v = k.to(dtype), v.to(dtype)
    for cfg in (KVOConfig(), KVOConfig(chunk=4, group=32, k_keep=6, v_keep=20, k_diff_bits=4, v_bits=1)):
        got, want = encode_chunks(k, v, scores, cfg), encode_chunks_oracle(k, v, scores, cfg)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    n=st.integers(1, 40),
    data=st.data(),
    coarse=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_largest_by_sort_picks_what_topk_picks(lead, n, data, coarse, seed) -> None:
    """The CUDA formulation (stable sort) and the CPU one (topk of distinct int64 keys) keep the same
    entries as the stable descending argsort, ties and zeros included, along any dim."""
    count = data.draw(st.integers(1, n))
    dim = data.draw(st.integers(-len(lead) - 1, len(lead)))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=gen).abs().movedim(-1, dim)
    if coarse:
        x = _ties(x, gen).abs()
    want = _largest_oracle(x, count, dim)
    assert torch.equal(largest(x, count, dim, by_sort=True), want)
    assert torch.equal(largest(x, count, dim, by_sort=False), want)


def test_encode_recent_is_bit_identical_to_the_former_quantiser() -> None:
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(70, 2, 3, 64, generator=gen)
    got = encode_recent(k, k, KVOConfig())
    kg = k.reshape(70, 2, 3, 2, 32)
    scale, zero = _fit_range_oracle(kg, -1, 255)
    assert torch.equal(got["rk_codes"], _quantize_oracle(kg, scale, zero, 255).reshape(70, 2, 3, 64))
    assert torch.equal(got["rk_scale"], scale.squeeze(-1)) and torch.equal(got["rk_zero"], zero.squeeze(-1))


# ----------------------------------------------------------------- scores from the attention's lse
def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """The executor's prefill mask [b, 1, t, t] of left-padded rows ``valid`` [b, t]."""
    return BatchState(valid.shape[0], valid.shape[1], valid.device).append(valid)[1]


def _lse_reference(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float64 log-sum-exp [b, n_q, t] of each query's scaled logits over its allowed keys."""
    b, n_q, t, d = q.shape
    kr = k.double().repeat_interleave(n_q // k.shape[1], dim=1)
    logits = (q.double() @ kr.transpose(-1, -2)) / math.sqrt(d)
    return logits.masked_fill(~mask, float("-inf")).logsumexp(dim=-1)


def _padded(b: int, t: int, pad: int) -> torch.Tensor:
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, :pad] = False  # left padding in the first row
    return valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_q", "n_kv", "d"), [(4, 4, 64), (8, 2, 32), (2, 1, 128)])
def test_prefill_attention_is_attend_plus_the_lse(dtype: torch.dtype, n_q: int, n_kv: int, d: int) -> None:
    """The output is attend's, bit for bit (the prefill stays exact); the lse is the float64 one's."""
    b, t = 2, 77
    q, k = _qkv(b, n_q, n_kv, t, d, seed=d, dtype=dtype)
    v = torch.randn(b, n_kv, t, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = _prefill_mask(_padded(b, t, 20))
    out, lse = prefill_attention(q, k, v, mask)
    assert torch.equal(out, attend(q, k, v, mask))
    assert lse.shape == (b, n_q, t) and lse.dtype == torch.float32
    # bf16: the CPU kernel's logits come from bf16 products; float32 sums everywhere else
    atol = 1e-5 if dtype == torch.float32 else 5e-4
    torch.testing.assert_close(lse.double(), _lse_reference(q, k, mask), rtol=1e-6, atol=atol)
    torch.testing.assert_close(blocked_lse(q, k, mask).double(), _lse_reference(q, k, mask), rtol=1e-6, atol=1e-5)


def test_prefill_attention_without_a_fused_kernel_falls_back_to_attend(monkeypatch) -> None:
    """Any other backend: attend's output and a blocked float32 lse."""
    q, k = _qkv(2, 4, 2, 50, 32, seed=8)
    mask = _prefill_mask(_padded(2, 50, 9))
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *args, **kwargs: SDPBackend.MATH.value)
    out, lse = prefill_attention(q, k, k, mask)
    assert torch.equal(out, attend(q, k, k, mask))
    torch.testing.assert_close(lse.double(), _lse_reference(q, k, mask), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    ("b", "n_q", "n_kv", "t", "d", "window"),
    [
        (2, 4, 4, 300, 32, 128),
        (3, 8, 2, 517, 64, 128),
        (1, 2, 1, 40, 32, 7),
        (2, 4, 2, 96, 32, 1000),
        (2, 2, 1, 65, 32, 64),
        (2, 2, 2, 1, 32, 128),
    ],
)
def test_band_scores_equal_the_per_block_softmax(b, n_q, n_kv, t, d, window) -> None:
    q, k = _qkv(b, n_q, n_kv, t, d, seed=t)
    valid = _padded(b, t, t // 5)
    lse = _lse_reference(q, k, _prefill_mask(valid)).float()
    got = band_scores(q, k, valid, lse, window)
    want = received_attention_oracle(q, k, valid, window)
    assert got.shape == (t, b, n_kv) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got[: t // 5, 0] == 0).all()  # padding receives nothing
    if t > 1:
        assert (got[-1] == 0).all() and (got[t // 5 : -1, 0] > 0).all()  # nobody after the last; real keys get mass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_band_scores_of_half_inputs(dtype: torch.dtype) -> None:
    """q and k in the model dtype: widened per pass, summed in float32 as the oracle does."""
    q, k = _qkv(2, 4, 2, 200, 64, seed=3, dtype=dtype)
    valid = _padded(2, 200, 17)
    lse = _lse_reference(q, k, _prefill_mask(valid)).float()
    got = band_scores(q, k, valid, lse, 128)
    torch.testing.assert_close(got, received_attention_oracle(q, k, valid, 128), rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    n_kv=st.integers(1, 3),
    group=st.integers(1, 3),
    t=st.integers(1, 200),
    window=st.integers(1, 260),
    pad=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_band_scores_with_the_attention_lse_equal_the_oracle(b, n_kv, group, t, window, pad, seed) -> None:
    """Any shape, window and padding: the band normalised by prefill_attention's lse is the oracle's."""
    q, k = _qkv(b, n_kv * group, n_kv, t, 32, seed=seed)
    valid = _padded(b, t, min(pad, t - 1))
    v = torch.randn(b, n_kv, t, 32, generator=torch.Generator().manual_seed(seed))
    _, lse = prefill_attention(q, k, v, _prefill_mask(valid))
    got = band_scores(q, k, valid, lse, window)
    torch.testing.assert_close(got, received_attention_oracle(q, k, valid, window), rtol=1e-5, atol=1e-6)


def test_band_scores_give_the_same_encoding() -> None:
    """The band scores reorder the chunks as the oracle's do: the encoded tensors are equal."""
    b, n_kv, t, d = 2, 2, 512, 64
    q, k = _qkv(b, 2 * n_kv, n_kv, t, d, seed=11)
    v = torch.randn(t, b, n_kv, d, generator=torch.Generator().manual_seed(12))
    valid = torch.ones(b, t, dtype=torch.bool)
    _, lse = prefill_attention(q, k, k, _prefill_mask(valid))
    cfg, kt = KVOConfig(), k.permute(2, 0, 1, 3)  # [t, b, n_kv, d]
    got = encode_chunks(kt, v, band_scores(q, k, valid, lse, 128), cfg)
    want = encode_chunks(kt, v, received_attention_oracle(q, k, valid, 128), cfg)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_attention_on_cuda_is_attend_plus_the_lse() -> None:
    """The memory-efficient kernel called with its lse on gives attend's fp16 output bit for bit."""
    b, n_q, n_kv, t, d = 2, 8, 4, 300, 128
    q, k = (x.cuda() for x in _qkv(b, n_q, n_kv, t, d, seed=4, dtype=torch.float16))
    v = torch.randn(b, n_kv, t, d, device="cuda", dtype=torch.float16)
    valid = _padded(b, t, 33).cuda()
    mask = _prefill_mask(valid)
    out, lse = prefill_attention(q, k, v, mask)
    assert torch.equal(out, attend(q, k, v, mask))
    torch.testing.assert_close(lse.double(), _lse_reference(q, k, mask), rtol=1e-5, atol=1e-4)
    got = band_scores(q, k, valid, lse, 128)
    torch.testing.assert_close(got.cpu(), received_attention_oracle(q, k, valid, 128).cpu(), rtol=1e-4, atol=1e-5)
