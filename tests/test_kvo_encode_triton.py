"""The fused Triton KVO encoder against the torch reference: every tensor equal, bit for bit.

On CUDA the kernels are compiled; elsewhere they run in Triton's CPU interpreter, one program at a
time in Python, so the shapes stay small. The interpreter must be on (TRITON_INTERPRET=1) before
triton is first imported, which another test of a whole run may already have done (torch.compile
imports it): so without a GPU the file runs in a pytest process of its own, started with the
interpreter on by ``test_the_file_in_the_triton_interpreter``, and its tests skip in the parent.

No tolerance anywhere: the kernels repeat the reference's float32 operations in its order, so
codes, scales, zeros, masks and order are ``torch.equal`` to ``encode_chunks_torch``'s, and so are
their decodes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import token_prompts
from kvpr.compress import kvo_triton
from kvpr.compress.kvo import (
    decode_k_chunks,
    decode_v_groups,
    encode_chunks,
    encode_chunks_from_recent,
    encode_chunks_torch,
    encode_recent,
    rotate_kv,
)
from kvpr.compress.kvo_config import K_DIFF_RANGE, KVOConfig
from kvpr.compress.quant import quantize_groups
from kvpr.errors import KvprError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # as this process started, before triton's import
DRIVER = "test_the_file_in_the_triton_interpreter"

CONFIGS = {
    "paper": KVOConfig(),
    "per_channel": KVOConfig(k_diff_axis="channel"),
    # chunk 4 (8 anchors a group, 2-bit order), k_keep not a power of two, 4-bit differences, 1-bit V
    "narrow": KVOConfig(chunk=4, k_keep=6, v_keep=20, k_diff_bits=4, v_bits=1),
    # every difference kept, one non-anchor V kept, 4-bit anchors, 16-token groups with channel ranges
    "extremes": KVOConfig(window=64, chunk=8, group=16, k_keep=16, v_keep=3, k_anchor_bits=4, k_diff_axis="channel"),
    # 8-channel groups of two 4-token chunks
    "small_groups": KVOConfig(chunk=4, group=8, k_keep=3, v_keep=5),
    # one difference kept per group, all but one non-anchor V kept
    "single": KVOConfig(k_keep=1, v_keep=31),
    # no non-anchor V kept (decode_v_groups cannot gather from the empty v_codes: encodings only)
    "anchors_only": KVOConfig(v_keep=4),
}


@pytest.fixture(autouse=True)
def triton_here(request: pytest.FixtureRequest) -> None:
    """Without a GPU the tests run only in the interpreter's own process (the module docstring)."""
    if not CUDA and not INTERPRETED and request.function.__name__ != DRIVER:
        pytest.skip(f"run with the Triton interpreter on, in its own process, by {DRIVER}")


@pytest.mark.skipif(CUDA or INTERPRETED, reason="the file's tests run here directly")
def test_the_file_in_the_triton_interpreter() -> None:
    """Every test of this file, in a pytest process started with TRITON_INTERPRET=1."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(filter(None, [str(root), str(root / "tests"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", f"not {DRIVER}"]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout.splitlines()[-1], done.stdout[-500:]


def _ties(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Coarse values: many equal magnitudes and zeros, so every tie rule is exercised."""
    return torch.where(torch.rand(x.shape, generator=gen) < 0.3, torch.zeros_like(x), x).mul(2).round().div(2)


def _inputs(t: int, b: int, n: int, d: int, dtype: torch.dtype, ties: bool, seed: int = 0):
    """K (outlier channels), V, scores [t, b, n_kv] on the device; with ``ties``: coarse values, tied
    scores, a constant chunk (zero scales) and a chunk of padding (-inf scores)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(t, b, n, d, generator=gen) * (1 + 4 * torch.rand(d, generator=gen)) + 0.5
    v = torch.randn(t, b, n, d, generator=gen)
    scores = torch.rand(t, b, n, generator=gen)
    if ties:
        k, v, scores = _ties(k, gen), _ties(v, gen), scores.mul(4).round()
        k[:8] = 1.0
        scores[16:24] = float("-inf")
    return k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), scores.to(DEVICE)


def _decoded(ts: dict[str, torch.Tensor], cfg: KVOConfig, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts decoded in stored order: K [C, b, n_kv, S, d], V [nG, b, n_kv, P, S, d]."""
    if cfg.per_channel:  # each chunk its group's range, as KVOCodec.decode
        ts = ts | {name: ts[name].repeat_interleave(cfg.anchors_per_group, dim=0) for name in K_DIFF_RANGE}
    return decode_k_chunks(ts, cfg, d), decode_v_groups(ts, cfg, d)


def assert_same_encoding(
    k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, cfg: KVOConfig, decode: bool = True
) -> None:
    got = encode_chunks(k, v, scores, cfg, fused=True)
    want = encode_chunks_torch(k, v, scores, cfg)
    assert got.keys() == want.keys()
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        assert torch.equal(got[name], expected), name
    if not decode:
        return
    for fused_part, torch_part in zip(_decoded(got, cfg, k.shape[3]), _decoded(want, cfg, k.shape[3])):
        assert torch.equal(fused_part, torch_part)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("t", "b", "n", "d", "dtype"),
    [(64, 2, 1, 64, torch.float32), (32, 1, 3, 128, torch.float16), (64, 3, 1, 64, torch.bfloat16)],
)
def test_fused_encoder_equals_the_torch_encoder(t, b, n, d, dtype, ties) -> None:
    """Several shapes (b > 1, odd head counts, d 64 and 128) and input dtypes, the paper's codec."""
    assert_same_encoding(*_inputs(t, b, n, d, dtype, ties, seed=t + d), CONFIGS["paper"])


@pytest.mark.parametrize("name", ["per_channel", "narrow", "extremes", "small_groups", "single", "anchors_only"])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_encoder_equals_the_torch_encoder_for_other_knobs(name: str, ties: bool) -> None:
    k, v, scores = _inputs(64, 2, 1, 64, torch.float32, ties, seed=1)
    assert_same_encoding(k, v, scores, CONFIGS[name], decode=name != "anchors_only")


def test_the_tiles_change_no_result() -> None:
    """Whole head_dim programs of several warps (the GPU benchmark's other choices) encode alike."""
    k, v, scores = _inputs(32, 2, 1, 128, torch.float16, ties=True, seed=3)
    cfg = CONFIGS["per_channel"]
    want = encode_chunks_torch(k, v, scores, cfg)
    for tiles in (kvo_triton.Tiles(128, 4, 128, 4), kvo_triton.Tiles(64, 1, 8, 2)):
        got = kvo_triton.encode_chunks_fused(k, v, scores, cfg, tiles)
        assert all(torch.equal(got[name], want[name]) for name in want), tiles
    with pytest.raises(KvprError, match="powers of two"):
        kvo_triton.Tiles(k_channels=48)


@pytest.mark.parametrize(("name", "d"), [("paper", 128), ("extremes", 64), ("narrow", 64)])
def test_fused_encoder_reads_k_in_its_recent_int8_form(name: str, d: int) -> None:
    """The runtime's path: K from ``encode_recent``'s int8 form, dequantised in the kernel, encodes
    as the torch path's ``decode_recent_k`` then ``encode_chunks``."""
    cfg = CONFIGS[name]
    k, v, scores = _inputs(32, 2, 1, d, torch.float16, ties=True, seed=4)
    recent = encode_recent(k, v, cfg)
    got = encode_chunks_from_recent(recent, recent["rv"], scores, cfg, fused=True)
    want = encode_chunks_from_recent(recent, recent["rv"], scores, cfg, fused=False)
    assert got.keys() == want.keys()
    assert all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)
    assert all(torch.equal(a, b) for a, b in zip(_decoded(got, cfg, d), _decoded(want, cfg, d)))


@pytest.mark.parametrize("rotate", ["k", "kv"])
def test_fused_encoder_takes_rotated_parts(rotate: str) -> None:
    """``rotate`` happens before the encoder (``rotate_kv``): its float32 output encodes alike."""
    cfg = dataclasses.replace(CONFIGS["per_channel"], rotate=rotate)
    k, v, scores = _inputs(32, 2, 2, 64, torch.float16, ties=False, seed=2)
    assert_same_encoding(*rotate_kv(k, v, cfg), scores, cfg)


def test_no_tokens_give_empty_tensors_of_the_same_shapes() -> None:
    k, v, scores = _inputs(0, 2, 2, 64, torch.float32, ties=False)
    got, want = (
        kvo_triton.encode_chunks_fused(k, v, scores, KVOConfig()),
        encode_chunks_torch(k, v, scores, KVOConfig()),
    )
    assert {name: x.shape for name, x in got.items()} == {name: x.shape for name, x in want.items()}


def test_dispatch_takes_the_fused_path_where_it_runs_and_supports(monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto: fused wherever Triton runs (CUDA, the interpreter) for supported knobs;
    3-bit codes (which straddle bytes) take the torch path; asking the fused path for them is one
    clear error."""
    calls: list[KVOConfig] = []
    fused = kvo_triton.encode_chunks_fused

    def spy(k, v, scores, cfg):
        calls.append(cfg)
        return fused(k, v, scores, cfg)

    monkeypatch.setattr(kvo_triton, "encode_chunks_fused", spy)
    k, v, scores = _inputs(32, 1, 1, 64, torch.float32, ties=False)
    encode_chunks(k, v, scores, KVOConfig())
    three_bit = KVOConfig(v_bits=3)
    assert not kvo_triton.supports(three_bit, 64) and not kvo_triton.supports(KVOConfig(group=24, window=48), 64)
    assert torch.equal(
        encode_chunks(k, v, scores, three_bit)["v_codes"], encode_chunks_torch(k, v, scores, three_bit)["v_codes"]
    )
    assert kvo_triton.runs_here(k)  # the interpreter here, or CUDA: auto takes the fused path
    assert calls == [KVOConfig()]
    with pytest.raises(KvprError, match="fused=False"):
        kvo_triton.encode_chunks_fused(k, v, scores, three_bit)
    recent: list[int] = []
    quantize_recent_k = kvo_triton.quantize_recent_k
    monkeypatch.setattr(
        kvo_triton, "quantize_recent_k", lambda k, group: recent.append(group) or quantize_recent_k(k, group)
    )
    encode_recent(k, v, KVOConfig())
    encode_recent(k[:0], v[:0], KVOConfig())  # no tokens: the torch path's empty tensors
    encode_recent(k, v, KVOConfig(), fused=False)  # the reference, asked for
    assert recent == [32] and not kvo_triton.recent_supports(24, 96)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kvo_triton.runs_here(k) == CUDA  # a CPU tensor needs the interpreter


@pytest.mark.parametrize(
    ("t", "b", "n", "d", "group", "dtype", "ties"),
    [
        (37, 2, 3, 64, 32, torch.float16, False),
        (20, 1, 2, 128, 32, torch.float32, True),
        (9, 3, 1, 64, 16, torch.bfloat16, True),
    ],
)
def test_fused_recent_quantiser_equals_the_torch_one(t, b, n, d, group, dtype, ties) -> None:
    """The recent window's K (int8 per token in channel groups): rows not a multiple of the tile."""
    k, v, _ = _inputs(t, b, n, d, dtype, ties, seed=t)
    got = encode_recent(k, v, KVOConfig(group=group, window=64))
    codes, scale, zero = quantize_groups(k.float(), 8, group)
    assert torch.equal(got["rk_codes"], codes) and got["rk_codes"].dtype == torch.uint8
    assert torch.equal(got["rk_scale"], scale) and torch.equal(got["rk_zero"], zero)
    assert torch.equal(got["rv"], v.to(torch.float16))
    fused = kvo_triton.quantize_recent_k(k, group)
    assert all(torch.equal(a, b) for a, b in zip(fused, (codes, scale, zero)))


# ----------------------------------------------------------------------------- whole prefill
@pytest.mark.parametrize("params", [(), (("k_diff_axis", "channel"), ("rotate", "kv"))])
def test_kvo_prefill_with_the_fused_encoder_caches_what_the_torch_encoder_does(
    tiny_checkpoint, monkeypatch: pytest.MonkeyPatch, params
) -> None:
    """A KVO prefill (fp16 on CUDA, float32 in the interpreter; two rows, one left-padded, GQA): every
    layer's anchors, packed K/V/order rows and recent window are equal with the fused kernels (K
    read in its int8 recent form) and with the torch paths, and so are the logits after it and
    after two decode steps."""
    import kvpr.runtime.kvo_cache as kvo_cache
    from kvpr.api import LLM
    from kvpr.config import CacheConfig, EngineConfig, RuntimeConfig
    from kvpr.runtime.kvo_cache import KVOCache

    cache = CacheConfig(kv_codec="kvo", kv_codec_params=params)
    runtime = RuntimeConfig(device=DEVICE.type, dtype="float16" if CUDA else "float32")
    llm = LLM(EngineConfig(model=str(tiny_checkpoint("llama-d32")), cache=cache, runtime=runtime), 2, 210)
    ids = torch.tensor(token_prompts([200, 200], seed=5), device=DEVICE)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :50] = False

    def run() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        executor = llm.make_executor(2, 210)
        logits = [executor.prefill(ids, valid)]
        logits += [executor.decode(ids[:, step]) for step in range(2)]
        caches = [c for c in executor.caches if isinstance(c, KVOCache)]
        assert caches and all(c.num_chunks > 0 for c in caches)
        state = []
        for c in caches:
            tiers = (c.k_rows, c.v_rows, c.orders)  # rows past ``length`` were never written
            state += [*c.anchors.values(), *(tier.rows[: tier.length] for tier in tiers), *c.recent.values()]
        return logits, state

    launches: list[int] = []  # tokens of each fused encode (layout probes included)
    fused = kvo_triton.encode_chunks_fused

    def spy(k, *args, **kwargs):
        launches.append(len(k))
        return fused(k, *args, **kwargs)

    monkeypatch.setattr(kvo_triton, "encode_chunks_fused", spy)
    for name in (
        "encode_chunks_from_recent",
        "encode_recent",
    ):  # the fused paths, asked for (CUDA's default may not be)
        monkeypatch.setattr(kvo_cache, name, functools.partial(getattr(kvo_cache, name), fused=True))
    fused_logits, fused_state = run()
    assert launches.count(128) == 2  # both compressed layers' prompts (2 finalised windows) went through it
    for name in ("encode_chunks_from_recent", "encode_recent"):  # the torch paths, end to end
        monkeypatch.setattr(kvo_cache, name, functools.partial(getattr(kvo_cache, name).func, fused=False))
    torch_logits, torch_state = run()
    assert launches.count(128) == 2
    assert all(torch.equal(a, b) for a, b in zip(fused_state, torch_state))
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, torch_logits))
