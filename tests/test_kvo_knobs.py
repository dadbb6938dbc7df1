"""KVO's knobs beyond the paper: the Hadamard rotation (``rotate``) and per-channel K differences
(``k_diff_axis="channel"``): exact formulations, error bounds, bytes, flags."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_kvo_cache_follows_reference, teacher_forced, token_prompts
from conftest import kvo_keys_values as kv
from conftest import kvo_shape as shape
from conftest import method_llm as engine
from kvpr.cache.rows import GatherStaging
from kvpr.cli import _parser as build_parser
from kvpr.compress.kvo import KVOCodec, decode_k_chunks, rotate_kv
from kvpr.compress.kvo_config import KVOConfig
from kvpr.compress.kvo_state import KVOLayerState
from kvpr.compress.methods import knob_params, method_config, parse_codec_spec
from kvpr.compress.packing import unpack_bits, unpack_mask
from kvpr.compress.rotation import hadamard_matrix
from kvpr.errors import KvprError
from kvpr.runtime.kvo_cache import KVOCache
from kvpr.runtime.layer_caches import decode_attention

D32 = "llama-d32"
# 8 bits everywhere, nothing pruned, nothing left unselected
EIGHT_BIT = dict(top_chunks=10**6, k_diff_bits=8, k_keep=32, v_bits=8, v_anchor_bits=8, v_keep=32)
KNOBS = [
    {"rotate": "k"},
    {"rotate": "v"},
    {"rotate": "kv"},
    {"k_diff_axis": "channel"},
    {"rotate": "kv", "k_diff_axis": "channel"},
]


def rand(*size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*size, generator=torch.Generator().manual_seed(seed))


def test_rotate_kv_is_the_hadamard_matrix_and_its_own_inverse() -> None:
    k, v = kv(16, 2, 2, 64, seed=1)
    h = hadamard_matrix(64)
    rk, rv = rotate_kv(k, v, KVOConfig(rotate="k"))
    torch.testing.assert_close(rk, k @ h, rtol=0, atol=1e-5)
    assert rv is v
    back = rotate_kv(*rotate_kv(k, v, KVOConfig(rotate="kv")), KVOConfig(rotate="kv"))
    torch.testing.assert_close(back, (k, v), rtol=0, atol=1e-5)


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("on_host", [False, True])
def test_runtime_cache_equals_reference_state_with_knobs(knobs: dict, on_host: bool) -> None:
    """The runtime's rotated-query formulation (scores and attention in the stored basis, only the
    output un-rotated) selects and attends as the reference that un-rotates every decoded key and
    value, within float32 rounding; per-channel ranges ride in the V rows and decode the same."""
    assert_kvo_cache_follows_reference(KVOConfig(top_chunks=5, **knobs), rand(260, 2, 2, seed=13), on_host, 1e-5, 1e-5)


@pytest.mark.parametrize("rotate", ["k", "v", "kv"])
def test_rotated_decode_equals_unrotated_up_to_quantisation(rotate: str) -> None:
    """At 8 bits with nothing pruned, the rotated and the plain codec both return the input (in the
    model's basis) within 8-bit error, so they agree with each other to that error; the runtime's
    attention outputs agree likewise."""
    k, v = kv(200, 2, 2, 64, seed=5)
    scores = rand(200, 2, 2, seed=15)
    decoded = {}
    for name in ("none", rotate):
        decoded[name] = KVOCodec(KVOConfig(rotate=name, **EIGHT_BIT)).encode(k, v, scores)
        decoded[name] = KVOCodec(KVOConfig(rotate=name, **EIGHT_BIT)).decode(decoded[name], torch.float32)
    for part, x in enumerate((k, v)):
        scale = x.abs().amax()
        for name in decoded:
            assert (decoded[name][part] - x).abs().max() < 0.02 * scale, (name, part)
        assert (decoded[rotate][part] - decoded["none"][part]).abs().max() < 0.03 * scale
    q = torch.randn(2, 2, 64, generator=torch.Generator().manual_seed(6))
    dense = torch.ones(2, 2, 191, dtype=torch.bool)
    exact, _ = decode_attention(q, k[:191].permute(1, 2, 0, 3), v[:191].permute(1, 2, 0, 3), dense)
    outs = []
    for name in ("none", rotate):
        cache = KVOCache(KVOConfig(rotate=name, **EIGHT_BIT), shape(300), torch.device("cpu"))
        cache.prefill(k[:190], v[:190], torch.ones(190, 2, dtype=torch.bool), scores[:190])
        outs.append(cache.decode(q, k[190], v[190]))
        torch.testing.assert_close(outs[-1], exact, rtol=0, atol=0.1)  # 8-bit K error through a sharp softmax
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0.1)


def test_per_channel_differences_are_within_half_a_step_of_their_channel_range() -> None:
    """Per channel: one range per channel over a V group's 28 non-anchor differences; every kept
    difference decodes within half a step of it, a pruned one to the anchor's value."""
    cfg, d = KVOConfig(k_diff_axis="channel"), 64
    k, v = kv(64, 2, 2, d, seed=7)
    enc = KVOCodec(cfg).encode(k, v, rand(64, 2, 2, seed=17))
    ts = enc.tensors
    assert ts["k_diff_scale"].shape == (2, 2, 2, d)  # [nG, b, n, d]
    order = unpack_bits(ts["order"], cfg.order_bits, 8).long()  # [C, b, n, 8]
    kr = k.reshape(8, 8, 2, 2, d).permute(0, 2, 3, 1, 4).gather(3, order[..., None].expand(8, 2, 2, 8, d))
    per_chunk = dict(ts) | {name: ts[name].repeat_interleave(4, dim=0) for name in ("k_diff_scale", "k_diff_zero")}
    kr2 = decode_k_chunks(per_chunk, cfg, d).double()  # [C, b, n, 8, d]
    diff = kr.double()[..., 1:, :] - kr2[..., :1, :]  # [C, b, n, 7, d]: from the decoded anchor
    diff2 = kr2[..., 1:, :] - kr2[..., :1, :]
    keep = unpack_mask(ts["k_keep"], d).reshape(diff.shape)
    by_group = diff.reshape(2, 4, 2, 2, 7, d).permute(0, 2, 3, 1, 4, 5).reshape(2, 2, 2, 28, d)
    step = (by_group.amax(3, keepdim=True) - by_group.amin(3, keepdim=True)) / 3  # [nG, b, n, 1, d]
    bound = step.repeat_interleave(4, dim=0) / 2 * (1 + 2.0**-8) + diff.abs().amax() * (2.0**-9 / 3 + 1e-6)
    worst = (torch.where(keep, (diff - diff2).abs(), 0) - bound).max().item()
    assert worst <= 0, f"error exceeds the bound by {worst}"
    assert (diff2[~keep] == 0).all() and (keep.sum(-1) == 4 * cfg.k_keep // 2).all()  # 2 groups of 32


@pytest.mark.parametrize("knobs", [{"rotate": "kv"}, {"k_diff_axis": "channel"}])
def test_stored_bytes_rotation_none_per_channel_one_range_per_group(knobs: dict) -> None:
    """A rotation stores nothing: bytes per token and the packed tensors are unchanged. Per-channel
    ranges replace the per-token ones (4*d bytes per V group against 4*d/32 per non-anchor token)."""
    base, cfg = KVOConfig(), KVOConfig(**knobs)
    k, v = kv(650, 2, 2, 128, seed=8)
    caches = []
    for config in (base, cfg):
        cache = KVOCache(config, shape(700, d=128), torch.device("cpu"), True, staging=GatherStaging(False))
        cache.prefill(k[:640], v[:640], torch.ones(640, 2, dtype=torch.bool), rand(640, 2, 2, seed=18))
        windows = cache.num_chunks * config.chunk // config.window
        assert cache.packed_nbytes() == windows * config.window_nbytes(2, 2, 128)
        caches.append(cache)
    extra = 0 if "rotate" in knobs else (4 * 128 - 7 * 4 * 128 // 32 * 4) * 2  # per window, per head
    assert cfg.window_nbytes(2, 2, 128) == base.window_nbytes(2, 2, 128) + 2 * 2 * extra
    assert KVOCodec(cfg).bytes_per_token(1, 3, 64) - KVOCodec(base).bytes_per_token(1, 3, 64) == (
        0 if "rotate" in knobs else 3 * (4 * 64 - 7 * 4 * 64 // 32 * 4) * 2 / 64
    )
    assert caches[1].nbytes() == caches[0].nbytes() + (caches[1].packed_nbytes() - caches[0].packed_nbytes())


def test_offloaded_equals_on_device_with_knobs(tiny_checkpoint) -> None:
    """The engine with both knobs: host rows through staging give the device tier's logits."""
    directory = tiny_checkpoint(D32)
    params = (("top_chunks", 4), ("rotate", "kv"), ("k_diff_axis", "channel"))
    ids = torch.tensor(token_prompts([300, 300], seed=1))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :64] = False
    device_logits, _ = teacher_forced(engine(directory, "kvo", "none", params), ids, valid, 260)
    host_logits, _ = teacher_forced(engine(directory, "kvo", "cpu", params), ids, valid, 260)
    assert torch.equal(device_logits, host_logits)
    plain, _ = teacher_forced(engine(directory, "kvo", "cpu", (("top_chunks", 4),)), ids, valid, 260)
    assert not torch.equal(plain, host_logits)  # the knobs reached the caches


def test_knob_flags_specs_and_errors() -> None:
    parser = build_parser()
    args = parser.parse_args(
        ["generate", "--prompt", "x", "--kv-codec", "kvo", "--kvo-rotate", "k", "--kvo-k-diff-axis", "channel"]
    )
    assert knob_params(args, "kvo") == (("k_diff_axis", "channel"), ("rotate", "k"))
    assert parse_codec_spec("kvo:rotate=kv,k_diff_axis=channel") == (
        "kvo",
        (("rotate", "kv"), ("k_diff_axis", "channel")),
    )
    assert method_config("kvo") == KVOConfig() and KVOConfig().rotate == "none"
    for bad in ({"rotate": "q"}, {"k_diff_axis": "head"}):
        with pytest.raises(KvprError):
            KVOConfig(**bad)
    with pytest.raises(KvprError, match="power-of-two head_dim"):
        KVOLayerState(KVOConfig(rotate="k", group=32), 1, 1, 96)
