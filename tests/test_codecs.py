"""KV codecs: exact bit packing, error bounds against a float64 reference, true byte counts, KVO."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpr.cache.codec import EncodedKV, IdentityCodec, KVCodec, make_codec
from kvpr.compress.kvo import KVOCodec, decode_k_chunks, decode_v_groups, encode_recent
from kvpr.compress.kvo_config import KVOConfig
from kvpr.compress.kvo_state import KVOLayerState
from kvpr.compress.packing import pack_bits, pack_mask, unpack_bits, unpack_mask
from kvpr.errors import KvprError

CUDA = torch.cuda.is_available()
FP16_EPS = 2.0**-11  # relative rounding of a value stored as fp16
CODEC_NAMES = ("fp16", "int8", "int4", "kivi2", "kivi3", "kivi4", "kvo")


def kv(t: int, b: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with outlier channels (as real keys have) and plain values, [t, b, n, d] float32."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(t, b, n, d, generator=gen) * (1 + 4 * torch.rand(d, generator=gen)) + 0.5
    v = torch.randn(t, b, n, d, generator=gen)
    return k, v


# ---------------------------------------------------------------- reference (float64) quantiser
def ref_step(x: torch.Tensor, dim: int | tuple[int, ...], levels: int) -> torch.Tensor:
    """Float64 step of the min/max asymmetric grid over ``dim`` (kept), as the method defines it."""
    x = x.double()
    return (x.amax(dim=dim, keepdim=True) - x.amin(dim=dim, keepdim=True)) / levels


def half_step_bound(x: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:
    """Half a step, plus the outward fp16 rounding of scale and zero and float32 arithmetic."""
    mag = x.double().abs().amax()
    return step / 2 * (1 + 2.0**-8) + mag * (2.0**-9 / levels + 1e-6)


def assert_within(err: torch.Tensor, bound: torch.Tensor) -> None:
    worst = (err.double() - bound).max().item()
    assert worst <= 0, f"error exceeds the bound by {worst}"


# ---------------------------------------------------------------------------------- packing
@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 3, 4, 8]),
    lead=st.lists(st.integers(0, 3), max_size=2),
    length=st.integers(0, 37),
    seed=st.integers(0, 2**16),
)
def test_pack_bits_round_trip(bits: int, lead: list[int], length: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, length), generator=gen, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    expected = 3 * math.ceil(length / 8) if bits == 3 else math.ceil(length * bits / 8)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == expected
    assert torch.equal(unpack_bits(packed, bits, length), codes)
    mask = codes % 2 == 1
    assert pack_mask(mask).shape[-1] == math.ceil(length / 8)
    assert torch.equal(unpack_mask(pack_mask(mask), length), mask)


def test_pack_rejects_bad_widths() -> None:
    with pytest.raises(KvprError):
        pack_bits(torch.zeros(8, dtype=torch.uint8), 5)
    with pytest.raises(KvprError):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 2, 16)


# ------------------------------------------------------------------- registry and contract
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_registry_builds_protocol_codecs(name: str) -> None:
    codec = make_codec(name)
    assert isinstance(codec, KVCodec) and codec.name == name


@pytest.mark.parametrize(
    "name, params",
    [
        ("int9", {}),
        ("int4", {"group_size": 0}),
        ("int8", {"bits": 3}),
        ("kivi2", {"group": 32}),
        ("kvo", {"k_keep": 40}),
        ("kvo", {"chunk": 7}),
        ("kvo", {"gqa_reduce": "mean"}),
        ("kvo", {"nonsense": 1}),
        ("fp16", {"group_size": 32}),
    ],
)
def test_registry_rejects_bad_names_and_params(name: str, params: dict[str, object]) -> None:
    with pytest.raises(KvprError):
        make_codec(name, **params)


@pytest.mark.parametrize("name", ["int8", "int4", "kivi2", "kivi4", "kvo"])
def test_head_dim_must_fit_the_group(name: str) -> None:
    k, v = kv(64, 1, 1, 48)
    with pytest.raises(KvprError):
        make_codec(name).encode(k, v)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("t", [0, 13, 64, 150])
def test_round_trip_shapes_and_devices(name: str, t: int) -> None:
    codec = make_codec(name)
    k, v = kv(t, 2, 3, 64)
    enc = codec.encode(k, v)
    assert enc.num_tokens == t and codec.nbytes(enc) == enc.nbytes
    for dtype in (torch.float16, torch.float32):
        k2, v2 = codec.decode(enc.to("cpu", non_blocking=True), dtype)
        assert k2.shape == v2.shape == k.shape and k2.dtype == dtype
    with pytest.raises(KvprError):
        codec.decode(EncodedKV("other", enc.shape, enc.tensors), torch.float32)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encoded_tensors_are_contiguous_and_own_their_memory(name: str) -> None:
    codec = make_codec(name)
    k, v = kv(100, 2, 2, 64)  # 100 = whole groups/windows plus a remainder
    k, v = k.half(), v.half()
    before = codec.decode(codec.encode(k, v), torch.float32)
    enc = codec.encode(k.transpose(1, 2).contiguous().transpose(1, 2), v)  # a strided input too
    assert all(x.is_contiguous() for x in enc.tensors.values())
    k.fill_(7.0), v.fill_(7.0)  # the caller reuses its buffers
    for a, b in zip(before, codec.decode(enc, torch.float32), strict=True):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", CODEC_NAMES)
def test_gpu_matches_cpu(name: str) -> None:
    codec = make_codec(name)
    k, v = kv(150, 2, 3, 128)
    scores = {"scores": torch.rand(150, 2, 3)} if name == "kvo" else {}
    enc = codec.encode(k, v, **scores)
    gpu = codec.encode(k.cuda(), v.cuda(), **{n: s.cuda() for n, s in scores.items()})
    moved = enc.pin_memory().to("cuda", non_blocking=True)
    for a, b in zip(codec.decode(gpu, torch.float32), codec.decode(moved, torch.float32), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_state_matches_cpu() -> None:
    k, v = kv(300, 2, 2, 128, seed=13)
    scores, q = torch.rand(300, 2, 2), torch.randn(2, 4, 128)
    states = [KVOLayerState(KVOConfig(top_chunks=6), 2, 2, 128, torch.float32, dev) for dev in ("cpu", "cuda")]
    for state in states:
        state.append(k, v, scores)
    selected = [state.select_chunks(q) for state in states]
    assert torch.equal(selected[0], selected[1].cpu())
    for a, b in zip(states[0].gather(selected[0]), states[1].gather(selected[1]), strict=True):
        torch.testing.assert_close(a, b.cpu(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ error bounds
def test_identity_is_exact_to_its_dtype() -> None:
    k, v = kv(10, 2, 2, 64)
    for codec in (IdentityCodec(torch.float16), IdentityCodec(torch.bfloat16), IdentityCodec(torch.float32)):
        k2, v2 = codec.decode(codec.encode(k, v), torch.float32)
        assert torch.equal(k2, k.to(codec.dtype).float()) and torch.equal(v2, v.to(codec.dtype).float())


@pytest.mark.parametrize("name, bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_group_quant_error_within_half_step(name: str, bits: int, out_dtype: torch.dtype) -> None:
    codec = make_codec(name, group_size=32)
    k, v = kv(40, 2, 2, 128, seed=1)
    k2, v2 = codec.decode(codec.encode(k, v), out_dtype)
    levels = (1 << bits) - 1
    for x, x2 in ((k, k2), (v, v2)):
        xg, x2g = x.reshape(40, 2, 2, 4, 32), x2.reshape(40, 2, 2, 4, 32)
        bound = half_step_bound(x, ref_step(xg, -1, levels), levels)
        if out_dtype == torch.float16:  # computed in fp16: code * scale (<= the range), then + zero
            step = ref_step(xg, -1, levels)
            bound = bound + (step * levels + xg.double().abs() + step) * FP16_EPS
        assert_within((xg.double() - x2g.double()).abs(), bound)


def test_kivi_error_bounds_and_fp16_residual() -> None:
    codec = make_codec("kivi2")
    t, full = 75, 64
    k, v = kv(t, 2, 2, 64, seed=2)
    k2, v2 = codec.decode(codec.encode(k, v), torch.float32)
    kg = k[:full].reshape(2, 32, 2, 2, 64)  # keys: per channel over 32 tokens
    bound = half_step_bound(kg, ref_step(kg, 1, 3), 3)
    assert_within((kg.double() - k2[:full].reshape(kg.shape).double()).abs(), bound)
    vg = v[:full].reshape(full, 2, 2, 2, 32)  # values: per token over 32 channels
    bound = half_step_bound(vg, ref_step(vg, -1, 3), 3)
    assert_within((vg.double() - v2[:full].reshape(vg.shape).double()).abs(), bound)
    assert torch.equal(k2[full:], k[full:].half().float()) and torch.equal(v2[full:], v[full:].half().float())


# ------------------------------------------------------------------------------ byte counts
@pytest.mark.parametrize("name", ["int8", "int4", "kivi2", "kvo"])
@pytest.mark.parametrize("d", [64, 128])
def test_nbytes_matches_formula(name: str, d: int) -> None:
    codec = make_codec(name)
    t, b, n = 128, 2, 3
    enc = codec.encode(*kv(t, b, n, d))
    assert codec.nbytes(enc) == codec.bytes_per_token(b, n, d) * t
    per_elem = {"int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32, "kivi2": 0.25 + 4 / 32}
    if name in per_elem:  # codes plus an fp16 scale and zero per 32 elements, for K and for V
        assert codec.bytes_per_token(1, 1, d) == 2 * d * per_elem[name]


@pytest.mark.parametrize("d, per_token", [(64, 52.0), (128, 103.5)])
def test_kvo_bytes_by_hand(d: int, per_token: float) -> None:
    # One 64-token window of one head at d=128, in bytes:
    #   K anchors  8 x (128 codes + 4 groups x 4 B scale/zero)            = 1152
    #   K others  56 x (4 groups x 2 B kept codes + 16 B mask + 16 B s/z)  = 2240
    #   order      8 chunks x 4 B (8 slots x 4 bits)                        =   32
    #   V          2 groups x (4 x 64 B anchors + 12 x 32 B kept + 28 x 16 B mask + 128 x 4 B s/z)
    #                                                                     = 3200   -> 6624 / 64
    enc = make_codec("kvo").encode(*kv(64, 1, 1, d))
    assert enc.nbytes / 64 == per_token == make_codec("kvo").bytes_per_token(1, 1, d)


@pytest.mark.parametrize("d", [64, 128])
def test_kvo_storage_against_fp16(d: int) -> None:
    enc = make_codec("kvo").encode(*kv(64, 2, 2, d))
    fp16 = 2 * 64 * 2 * 2 * d * 2
    payload = sum(enc.tensors[n].numel() for n in ("k_anchor_codes", "k_diff_codes", "v_anchor_codes", "v_codes"))
    # Codes alone: K 1.44 + V 1.25 bits per element, the paper's 91.6% less than fp16.
    assert 1 - payload / fp16 >= 0.915
    # Everything (fp16 scales and zeros, keep masks, orders): DESIGN.md's "about 79.5% less".
    assert 1 - enc.nbytes / fp16 >= 0.795


# -------------------------------------------------------------------------------------- KVO
def stored_order(x: torch.Tensor, order: torch.Tensor, chunk: int) -> torch.Tensor:
    """[t, b, n, d] -> [C, b, n, chunk, d] in the codec's slot order."""
    t, b, n, d = x.shape
    xc = x.reshape(t // chunk, chunk, b, n, d).permute(0, 2, 3, 1, 4)
    return xc.gather(3, order[..., None].expand(*order.shape, d))


def test_kvo_anchor_is_most_attended_and_decode_restores_order() -> None:
    cfg = KVOConfig()
    k, v = kv(128, 2, 2, 64, seed=3)
    scores = torch.rand(128, 2, 2)
    codec = KVOCodec()
    enc = codec.encode(k, v, scores)
    order = unpack_bits(enc.tensors["order"], cfg.order_bits, 8).long()  # [C, b, n, 8]
    assert torch.equal(order[..., 0], scores.reshape(16, 8, 2, 2).argmax(1))
    assert torch.equal(order.sort(-1).values, torch.arange(8).expand_as(order))
    k2, _ = codec.decode(enc, torch.float32)
    kr2 = decode_k_chunks(enc.tensors, cfg, 64)  # [C, b, n, 8, d], stored order
    assert torch.equal(stored_order(k2, order, 8), kr2)


def test_kvo_key_bounds_anchors_unpruned() -> None:
    cfg, d = KVOConfig(), 128
    k, v = kv(64, 2, 2, d, seed=4)
    enc = KVOCodec().encode(k, v, torch.rand(64, 2, 2))
    order = unpack_bits(enc.tensors["order"], cfg.order_bits, 8).long()
    kr = stored_order(k, order, 8).double()  # [C, b, n, 8, d]
    kr2 = decode_k_chunks(enc.tensors, cfg, d).double()
    # Anchors: 8-bit on every channel (never pruned).
    anchor = kr[..., 0, :].reshape(8, 2, 2, 4, 32)
    err = (anchor - kr2[..., 0, :].reshape(anchor.shape)).abs()
    assert_within(err, half_step_bound(anchor, ref_step(anchor, -1, 255), 255))
    # Others: 2-bit differences from the decoded anchor; 8 of 32 kept, pruned = anchor's value.
    diff = (kr[..., 1:, :] - kr2[..., :1, :]).reshape(8, 2, 2, 7, 4, 32)
    diff2 = (kr2[..., 1:, :] - kr2[..., :1, :]).reshape(diff.shape)
    keep = unpack_mask(enc.tensors["k_keep"], d).reshape(diff.shape)
    assert (keep.sum(-1) == cfg.k_keep).all()
    bound = half_step_bound(diff, ref_step(diff, -1, 3), 3)
    assert_within(torch.where(keep, (diff - diff2).abs(), 0), bound)
    assert (diff2[~keep] == 0).all()
    smallest_kept = torch.where(keep, diff.abs(), math.inf).amin(-1, keepdim=True)
    assert (torch.where(keep, 0, diff.abs()) <= smallest_kept).all()


def test_kvo_value_bounds_anchors_kept_even_when_smallest() -> None:
    cfg, d = KVOConfig(), 64
    _, v = kv(64, 1, 2, d, seed=5)
    v = 1 + v.abs()  # all values in [1, inf): pruning one to 0 would be an error >= 1
    scores = torch.rand(64, 1, 2)
    anchor_pos = scores.reshape(8, 8, 1, 2).argmax(1)  # [C, b, n]
    is_anchor = torch.nn.functional.one_hot(anchor_pos, 8).permute(0, 3, 1, 2).reshape(64, 1, 2)
    v = torch.where(is_anchor.bool()[..., None], torch.full_like(v, 1.0), v)  # smallest |v|
    enc = KVOCodec().encode(v, v, scores)
    order = unpack_bits(enc.tensors["order"], cfg.order_bits, 8).long()
    vr = stored_order(v, order, 8).double().reshape(2, 4, 1, 2, 8, d).permute(0, 2, 3, 1, 4, 5)
    vr2 = decode_v_groups(enc.tensors, cfg, d).double()  # [nG, b, n, P, 8, d]
    step = ref_step(vr, (3, 4), 3)  # [nG, b, n, 1, 1, d]: per channel over 32 tokens
    assert_within((vr - vr2)[..., 0, :].abs(), half_step_bound(vr, step / 5, 15))  # 4-bit anchors
    others, others2 = vr[..., 1:, :].flatten(3, 4), vr2[..., 1:, :].flatten(3, 4)
    keep = unpack_mask(enc.tensors["v_keep"], d)  # [nG, b, n, 28, d]
    assert (keep.sum(3) == cfg.v_keep - cfg.anchors_per_group).all()
    bound = half_step_bound(vr, step.squeeze(3), 3)  # [nG, b, n, 1, d]
    assert_within(torch.where(keep, (others - others2).abs(), 0), bound)
    assert (others2[~keep] == 0).all()
    smallest_kept = torch.where(keep, others.abs(), math.inf).amin(3, keepdim=True)
    assert (torch.where(keep, 0, others.abs()) <= smallest_kept).all()


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_batched_encode_equals_one_by_one(name: str) -> None:
    codec = make_codec(name)
    k, v = kv(150, 3, 2, 64, seed=6)
    extra = {"scores": torch.rand(150, 3, 2)} if name == "kvo" else {}
    enc = codec.encode(k, v, **extra)
    parts = [
        codec.encode(k[:, i : i + 1], v[:, i : i + 1], **{n: s[:, i : i + 1] for n, s in extra.items()})
        for i in range(3)
    ]
    for tensor_name, x in enc.tensors.items():
        assert torch.equal(x, torch.cat([p.tensors[tensor_name] for p in parts], dim=1)), tensor_name
    assert enc.nbytes == sum(p.nbytes for p in parts)


# ---------------------------------------------------------------------------- KVO layer state
def test_state_recent_window_exact_v_int8_k() -> None:
    k, v = kv(100, 2, 2, 64, seed=7)
    state = KVOLayerState(KVOConfig(), 2, 2, 64, dtype=torch.float32)
    state.append(k, v)
    assert state.num_chunks == 0 and state.recent_len == 100
    k2, v2, mask = state.gather(state.select_chunks(torch.randn(2, 4, 64)))
    assert k2.shape == (2, 2, 100, 64) and mask.all()
    assert torch.equal(v2, v.half().float().permute(1, 2, 0, 3))
    kg = k.permute(1, 2, 0, 3).reshape(2, 2, 100, 2, 32)
    err = (kg.double() - k2.reshape(kg.shape).double()).abs()
    assert_within(err, half_step_bound(kg, ref_step(kg, -1, 255), 255))


def test_state_finalises_oldest_windows() -> None:
    state = KVOLayerState(KVOConfig(), 1, 2, 64)
    for total, (chunks, recent) in ((127, (0, 127)), (128, (8, 64)), (300, (24, 108))):
        state.append(*kv(total - state.num_tokens, 1, 2, 64))
        state.check_integrity()
        assert (state.num_chunks, state.recent_len) == (chunks, recent)


def test_state_steps_equal_bulk_and_match_the_codec() -> None:
    cfg = KVOConfig()
    k, v = kv(200, 2, 2, 64, seed=8)
    scores = torch.rand(200, 2, 2)
    bulk = KVOLayerState(cfg, 2, 2, 64, dtype=torch.float32)
    bulk.append(k, v, scores)
    steps = KVOLayerState(cfg, 2, 2, 64, dtype=torch.float32)
    for pos in range(200):
        steps.append(k[pos : pos + 1], v[pos : pos + 1], scores[pos : pos + 1])
    for a, b in zip(bulk.gather(), steps.gather(), strict=True):
        assert torch.equal(a, b)
    # Finalised windows are the codec's encoding of the int8 keys and fp16 values.
    rec = encode_recent(k[:128], v[:128], cfg)
    k8 = (
        rec["rk_codes"].float().reshape(128, 2, 2, 2, 32) * rec["rk_scale"].float()[..., None]
        + rec["rk_zero"].float()[..., None]
    ).reshape(128, 2, 2, 64)
    enc = KVOCodec().encode(k8, rec["rv"].float(), scores[:128])
    k2, v2, _ = bulk.gather()
    k_ref = decode_k_chunks(enc.tensors, cfg, 64).permute(1, 2, 0, 3, 4).reshape(2, 2, 128, 64)
    assert torch.equal(k2[:, :, :128], k_ref)
    v_ref = decode_v_groups(enc.tensors, cfg, 64).permute(1, 2, 0, 3, 4, 5).reshape(2, 2, 128, 64)
    assert torch.equal(v2[:, :, :128], v_ref)


def test_state_selects_largest_q_dot_anchor_gqa() -> None:
    torch.manual_seed(9)
    state = KVOLayerState(KVOConfig(), 2, 2, 64, dtype=torch.float32)
    state.append(*kv(256, 2, 2, 64, seed=9), torch.rand(256, 2, 2))
    q = torch.randn(2, 6, 64)  # 3 query heads per KV head
    anchors = state.anchor_keys().double()  # [b, n_kv, C, d]
    dots = torch.einsum("bngd,bncd->bngc", q.double().reshape(2, 2, 3, 64), anchors)
    assert torch.equal(state.select_chunks(q, 1)[..., 0], dots.amax(2).argmax(-1))
    assert torch.equal(state.select_chunks(q)[..., :3], dots.amax(2).topk(3).indices)
    summed = KVOLayerState(KVOConfig(gqa_reduce="sum"), 2, 2, 64)
    summed.windows, summed.chunk_valid = state.windows, state.chunk_valid
    assert torch.equal(summed.select_chunks(q, 1)[..., 0], dots.sum(2).argmax(-1))
    # A planted chunk whose anchor points along q wins.
    k, v = kv(256, 1, 1, 64, seed=10)
    k[77] = 20 * q[0, 0] / q[0, 0].norm()
    planted = KVOLayerState(KVOConfig(), 1, 1, 64)
    scores = torch.zeros(256, 1, 1)
    scores[77] = 1.0
    planted.append(k, v, scores)
    assert planted.select_chunks(q[:1, :1], 1).item() == 77 // 8
    k_sel, _, _ = planted.gather(planted.select_chunks(q[:1, :1], 1))
    assert (k_sel[0, 0, 0].float() - k[77, 0, 0]).abs().max() < 0.1


def test_state_gather_shapes_and_score_feedback() -> None:
    state = KVOLayerState(KVOConfig(top_chunks=5), 2, 2, 64)
    state.append(*kv(250, 2, 2, 64))
    selected = state.select_chunks(torch.randn(2, 2, 64))
    k, v, mask = state.gather(selected)
    assert selected.shape == (2, 2, 5) and k.shape == v.shape == (2, 2, 5 * 8 + 122, 64)
    assert k.dtype == torch.float16 and mask.all()
    before = state.recent_scores.clone()
    state.accumulate_scores(torch.ones(2, 4, state.recent_len))
    assert torch.equal(state.recent_scores, before + 2)
    with pytest.raises(KvprError):
        state.accumulate_scores(torch.ones(2, 2, 3))


def test_state_batched_with_padding_equals_one_by_one() -> None:
    k, v = kv(200, 2, 2, 64, seed=11)
    scores = torch.rand(200, 2, 2)
    pad = 64  # sequence 1 is left-padded by one window: its first 64 slots hold no token
    valid = torch.ones(200, 2, dtype=torch.bool)
    valid[:pad, 1] = False
    state = KVOLayerState(KVOConfig(top_chunks=10), 2, 2, 64, dtype=torch.float32)
    state.append(k, v, scores, valid)
    state.check_integrity()
    q = torch.randn(2, 2, 64)
    selected = state.select_chunks(q)  # [b, n, 10]; sequence 1 has only 8 non-padding chunks
    kb, vb, mask = state.gather()
    assert mask[0].all() and not mask[1, :, :pad].any() and mask[1, :, pad:].all()
    for seq, cut in ((0, 0), (1, pad)):
        alone = KVOLayerState(KVOConfig(top_chunks=8), 1, 2, 64, dtype=torch.float32)
        alone.append(k[cut:, seq : seq + 1], v[cut:, seq : seq + 1], scores[cut:, seq : seq + 1])
        ka, va, _ = alone.gather()
        assert torch.equal(ka[0], kb[seq, :, cut:]) and torch.equal(va[0], vb[seq, :, cut:])
        assert torch.equal(alone.select_chunks(q[seq : seq + 1])[0] + cut // 8, selected[seq, :, :8])


def test_state_padding_inside_a_chunk_is_masked() -> None:
    k, v = kv(192, 1, 2, 64, seed=12)
    valid = torch.ones(192, 1, dtype=torch.bool)
    valid[:68] = False  # chunk 8 holds 4 padding slots, then tokens 68..71
    state = KVOLayerState(KVOConfig(), 1, 2, 64, dtype=torch.float32)
    state.append(k, v, torch.rand(192, 1, 2), valid)
    assert (state.num_chunks, state.recent_len) == (16, 64)
    _, v2, mask = state.gather()
    assert torch.equal(state.chunk_valid[:, 0], torch.tensor([0] * 8 + [4] + [8] * 7, dtype=torch.uint8))
    assert mask[0, :, 64:68].all() and not mask[0, :, 68:72].any() and mask[0, :, 72:].all()
    assert (v2[0, :, 68:72] == 0).all()  # padding V is zeroed, so it never widens a range
