"""KIVI codecs at 2, 3 and 4 bits with the optional Hadamard rotation: packing, the rotation, error
bounds against a float64 reference, exact byte counts, the method configs and the fused decode."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_codecs import assert_within, half_step_bound, kv, ref_step

from kvpr.cache.codec import make_codec
from kvpr.compress.kivi import KiviCodec
from kvpr.compress.methods import (
    KiviConfig,
    knob_params,
    method_config,
    parse_codec_spec,
    recent_window,
)
from kvpr.compress.packing import pack_bits, packed_len, unpack_bits
from kvpr.compress.rotation import hadamard, hadamard_matrix
from kvpr.errors import KvprError

ROOT = Path(__file__).resolve().parents[1]


def sylvester(d: int) -> torch.Tensor:
    """The normalized Hadamard matrix by Kronecker products, float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / d**0.5


# ----------------------------------------------------------------------------- packing, rotation
def test_three_bit_codes_form_one_little_endian_bit_stream() -> None:
    codes = torch.randint(0, 8, (2, 21), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_bits(codes, 3)
    assert packed.shape[-1] == packed_len(21, 3) == 9  # 3 words of 8 codes, the last one zero-padded
    stream = sum(int(byte) << (8 * at) for at, byte in enumerate(packed[1].tolist()))
    assert [(stream >> (3 * c)) & 7 for c in range(21)] == codes[1].tolist()
    assert torch.equal(unpack_bits(packed, 3, 21), codes)


@pytest.mark.parametrize("d", [1, 2, 16, 64, 128])
def test_hadamard_is_the_orthogonal_sylvester_matrix(d: int) -> None:
    x = torch.randn(5, 3, d, dtype=torch.float64)
    assert torch.allclose(hadamard(x).double(), x @ sylvester(d), atol=1e-5)
    assert torch.allclose(hadamard_matrix(d).double(), sylvester(d), atol=1e-6)
    assert torch.allclose(hadamard(hadamard(x)).double(), x, atol=1e-5)  # its own inverse
    assert torch.allclose(hadamard(x).norm(dim=-1).double(), x.norm(dim=-1), atol=1e-4)


def test_rotation_needs_a_power_of_two_head_dim_and_a_known_name() -> None:
    with pytest.raises(KvprError, match="power-of-two"):
        make_codec("kivi4", rotate="k", group_size=16).encode(*kv(32, 1, 1, 48))
    with pytest.raises(KvprError, match="rotate"):
        make_codec("kivi4", rotate="q")
    make_codec("kivi4", group_size=16).encode(*kv(32, 1, 1, 48))  # unrotated: any multiple of the group


# ------------------------------------------------------------------------------- error bounds
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotate", ["none", "k", "v", "kv"])
def test_kivi_error_within_half_step_in_the_quantised_basis(bits: int, rotate: str) -> None:
    """Each part is within half a step of its own grid in the basis it was quantised in (rotated
    or not); the decode returns the model's basis (an orthogonal map keeps each token's L2 error)."""
    codec = make_codec(f"kivi{bits}", rotate=rotate)
    t, full, levels = 75, 64, (1 << bits) - 1
    k, v = kv(t, 2, 2, 64, seed=bits)
    k2, v2 = codec.decode(codec.encode(k, v), torch.float32)
    kq, k2q = (hadamard(x[:full]) if "k" in rotate else x[:full] for x in (k, k2))
    vq, v2q = (hadamard(x[:full]) if "v" in rotate else x[:full] for x in (v, v2))
    slack = 1e-5 * (1 + k.abs().max())  # float32 butterflies of the rotation, forward and back
    kg, k2g = kq.reshape(2, 32, 2, 2, 64), k2q.reshape(2, 32, 2, 2, 64)  # keys: per channel over 32 tokens
    assert_within((kg.double() - k2g.double()).abs(), half_step_bound(kg, ref_step(kg, 1, levels), levels) + slack)
    vg, v2g = vq.reshape(full, 2, 2, 2, 32), v2q.reshape(full, 2, 2, 2, 32)  # values: per token over 32 channels
    assert_within((vg.double() - v2g.double()).abs(), half_step_bound(vg, ref_step(vg, -1, levels), levels) + slack)
    assert torch.equal(k2[full:], k[full:].half().float()) and torch.equal(v2[full:], v[full:].half().float())


def test_rotating_values_spreads_an_outlier_channel() -> None:
    """Per-token V with one large channel: the rotation spreads it, so the other channels of its
    group no longer share its whole range; the error falls."""
    _, v = kv(64, 1, 2, 64, seed=3)
    v[..., 7] *= 30
    errors = {}
    for rotate in ("none", "v"):
        codec = make_codec("kivi2", rotate=rotate)
        _, v2 = codec.decode(codec.encode(v, v), torch.float32)
        errors[rotate] = (v - v2).pow(2).mean().item()
    assert errors["v"] < 0.75 * errors["none"]


# -------------------------------------------------------------------------------- byte counts
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("rotate", ["none", "kv"])
@pytest.mark.parametrize("group_size, token_group", [(32, 32), (64, 64), (64, 128), (16, 8)])
def test_nbytes_equals_bytes_per_token(bits: int, rotate: str, group_size: int, token_group: int) -> None:
    codec = make_codec(f"kivi{bits}", group_size=group_size, token_group=token_group, rotate=rotate)
    for d in (64, 128):
        t, b, n = 2 * token_group, 2, 3
        enc = codec.encode(*kv(t, b, n, d))
        assert codec.nbytes(enc) == enc.nbytes == codec.bytes_per_token(b, n, d) * t


@pytest.mark.parametrize(
    "name, params, per_token",
    [  # SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64; K and V of one token, all layers
        ("kivi4", {"group_size": 64, "token_group": 64}, 6480),  # (32 codes + 4 K meta + 32 + 4 V meta) x 90
        ("kivi3", {"group_size": 64, "token_group": 64}, 5040),  # (24 + 4 + 24 + 4) x 90
        ("kivi2", {"group_size": 64, "token_group": 64}, 3600),  # (16 + 4 + 16 + 4) x 90
        ("kivi2", {"group_size": 64, "token_group": 128}, 3420),  # (16 + 2 + 16 + 4) x 90
        ("kivi2", {}, 4320),  # KIVI's paper groups: (16 + 8 + 16 + 8) x 90
        ("kivi4", {"rotate": "kv"}, 7200),  # a rotation stores nothing
    ],
)
def test_bytes_by_hand_at_smollm2_shapes(name: str, params: dict[str, object], per_token: int) -> None:
    assert 30 * make_codec(name, **params).bytes_per_token(1, 3, 64) == per_token


# ------------------------------------------------------------------------------ method configs
def test_kivi_methods_share_one_config_at_three_widths() -> None:
    for bits in (2, 3, 4):
        config = method_config(f"kivi{bits}", {"rotate": "v", "group_size": 64})
        assert isinstance(config, KiviConfig) and config.codec().bits == bits
        assert recent_window(f"kivi{bits}", config) == 128
        assert isinstance(config.codec(), KiviCodec) and config.codec().rotate == "v"
    assert parse_codec_spec("kivi3:rotate=kv,token_group=64") == ("kivi3", (("rotate", "kv"), ("token_group", 64)))
    with pytest.raises(KvprError):
        method_config("kivi4", {"bits": 2})  # the width is the name's
    with pytest.raises(KvprError):
        method_config("kivi4", {"rotate": "x"})


def test_knobs_of_every_kivi_width_reach_its_config() -> None:
    """The engine runs every KIVI width and rotation, so a knob is refused only for another method."""

    class Args:
        knob_kivi4_rotate = "v"
        knob_kivi4_group_size = 64

    assert knob_params(Args(), "kivi4") == (("group_size", 64), ("rotate", "v"))  # type: ignore[arg-type]
    with pytest.raises(KvprError, match="--kivi4-group-size applies to --kv-codec kivi4, not kivi2"):
        knob_params(Args(), "kivi2")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- fused decode
_INTERPRET = """
import torch
from kvpr.cache.codec import make_codec
from kvpr.compress.kivi_triton import decode_fused
for bits in (2, 3, 4):
    for rotate in ("none", "kv"):
        for d, t in ((64, 75), (32, 40)):
            codec = make_codec(f"kivi{bits}", rotate=rotate)
            k = torch.randn(t, 2, 3, d) * (1 + 4 * torch.rand(d)); v = torch.randn(t, 2, 3, d)
            enc = codec.encode(k, v)
            for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2)):
                for a, b in zip(codec.decode_reference(enc, dtype), decode_fused(codec, enc, dtype)):
                    assert b.dtype == dtype and (a.float() - b.float()).abs().max() < tol, (bits, rotate, d, dtype)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its interpreter runs on CPU)")
def test_fused_kernel_matches_the_torch_oracle_in_the_triton_interpreter() -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", _INTERPRET], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cpu_decode_never_imports_triton() -> None:
    code = (
        "import sys, torch; from kvpr.cache.codec import make_codec; c = make_codec('kivi4', rotate='kv'); "
        "c.decode(c.encode(torch.randn(40, 1, 2, 64), torch.randn(40, 1, 2, 64)), torch.float16); "
        "import kvpr.compress.kivi_triton; assert 'triton' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
