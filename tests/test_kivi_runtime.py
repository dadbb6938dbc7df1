"""KIVI at 2, 3 and 4 bits in the engine (``--kv-codec kivi2|kivi3|kivi4``, rotations included): the
logits of a decode-then-attend reference built on the codec itself, the bytes the codec accounts
for, and an error against fp16 that falls as the width grows."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import method_llm, teacher_forced, token_prompts
from kvpr.api import LLM
from kvpr.compress.kivi import KiviCodec
from kvpr.compress.methods import method_config, parse_codec_spec
from kvpr.config import CACHE_METHODS, KIVI_METHODS, CacheConfig, Offload
from kvpr.errors import KvprError
from kvpr.models.common import attend
from kvpr.runtime.compressed import CacheMethod, make_method

D32 = "llama-d32"  # 4 layers, 2 KV heads, head_dim 32: a power of two, so every rotation applies
KNOBS = "residual=32,token_group=16"  # the 100-token prompt quantises 96 tokens, decoding 32 more at 128
SPECS = (f"kivi2:{KNOBS}", f"kivi3:{KNOBS},rotate=v", f"kivi4:{KNOBS},rotate=kv")
PROMPT, TOTAL = 100, 140  # teacher-forced: logits at the prompt's end and at 40 decode steps


def kivi_llm(directory: object, spec: str, offload: str = "cpu") -> LLM:
    name, params = parse_codec_spec(spec)
    return method_llm(directory, name, offload, params)


def as_cached(codec: KiviCodec, residual: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """K,V [s, b, n_kv, d] as a KIVI cache holds them: in fp16, the first ``s // residual * residual``
    tokens encoded and decoded by the codec (plain torch decode), the newest in the fp16 residual."""
    full = k.shape[0] // residual * residual
    k16, v16 = k.half(), v.half()
    k_old, v_old = codec.decode_reference(codec.encode(k16[:full], v16[:full]), k.dtype)
    return torch.cat([k_old, k16[full:].to(k.dtype)]), torch.cat([v_old, v16[full:].to(k.dtype)])


@torch.inference_mode()
def reference_logits(llm: LLM, spec: str, ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits of one sequence [1, TOTAL], written out from the model's layer functions:
    a dense causal prefill of PROMPT tokens, then one token per step attending over every earlier
    token's K,V passed through :func:`as_cached`, not through the engine's cache or its row packing."""
    name, params = parse_codec_spec(spec)
    config = method_config(name, params)
    codec = config.codec()
    model, dtype = llm.model, llm.dtype
    positions = torch.arange(TOTAL)[None]  # [1, TOTAL]
    keys: list[torch.Tensor] = []  # per layer [s, 1, n_kv, d], as computed
    values: list[torch.Tensor] = []
    hidden = model.embed(ids[:, :PROMPT], positions[:, :PROMPT])  # [1, PROMPT, h]
    rope = model.rope(positions[:, :PROMPT], dtype)
    causal = torch.ones(PROMPT, PROMPT, dtype=torch.bool).tril()[None, None]  # [1, 1, q, s]
    for layer in model.decoder_layers:
        x = layer.attn_input(hidden)
        k, v = layer.kv_from_input(x, rope)  # [1, PROMPT, n_kv, d]
        out = attend(layer.query(x, rope), k.transpose(1, 2), v.transpose(1, 2), causal)
        keys.append(k.transpose(0, 1))
        values.append(v.transpose(0, 1))
        hidden = layer.finish(hidden, out)
    logits = [model.logits(hidden[:, -1:])[:, -1]]
    for step in range(PROMPT, TOTAL):
        hidden = model.embed(ids[:, step : step + 1], positions[:, step : step + 1])  # [1, 1, h]
        rope = model.rope(positions[:, step : step + 1], dtype)
        for i, layer in enumerate(model.decoder_layers):
            x = layer.attn_input(hidden)
            k, v = layer.kv_from_input(x, rope)  # [1, 1, n_kv, d]
            keys[i] = torch.cat([keys[i], k.transpose(0, 1)])
            values[i] = torch.cat([values[i], v.transpose(0, 1)])
            k_seen, v_seen = as_cached(codec, config.residual, keys[i], values[i])  # [s, 1, n_kv, d]
            everything = torch.ones(1, 1, 1, step + 1, dtype=torch.bool)
            out = attend(
                layer.query(x, rope),
                k_seen.permute(1, 2, 0, 3),
                v_seen.permute(1, 2, 0, 3),
                everything,
            )
            hidden = layer.finish(hidden, out)
        logits.append(model.logits(hidden)[:, -1])
    return torch.stack(logits)  # [TOTAL - PROMPT + 1, 1, V]


def test_every_kivi_width_is_an_engine_method() -> None:
    assert set(KIVI_METHODS) <= set(CACHE_METHODS)
    for name in KIVI_METHODS:
        assert isinstance(method_config(name).codec(), KiviCodec)


@pytest.mark.parametrize("spec", SPECS)
def test_engine_logits_equal_the_codecs_decode_then_attend(tiny_checkpoint, spec: str) -> None:
    """The engine's KiviCache (row packing, on the host, blocks quantised as the residual fills)
    gives the logits of attending over the codec's own decode: the spec's width and rotation reach
    the cache."""
    llm = kivi_llm(tiny_checkpoint(D32), spec)
    ids = torch.tensor(token_prompts([TOTAL], seed=11))
    logits, executor = teacher_forced(llm, ids, torch.ones_like(ids, dtype=torch.bool), PROMPT)
    rotate = dict(parse_codec_spec(spec)[1]).get("rotate", "none")
    assert all((cache.codec.bits, cache.codec.rotate) == (int(spec[4]), rotate) for cache in executor.caches)
    torch.testing.assert_close(logits, reference_logits(llm, spec, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "spec, per_token",
    [  # one layer, 2 KV heads of 32 channels; per head K codes + fp16 scale, zero per 16 tokens
        # (4 * 32 / 16 = 8) + V codes + fp16 scale, zero per 32 channels (4)
        (SPECS[0], 2 * (8 + 8 + 8 + 4)),  # 2 bits: 8 bytes of codes per head
        (SPECS[1], 2 * (12 + 8 + 12 + 4)),  # 3 bits: 32 codes in 4 words of 3 bytes
        (SPECS[2], 2 * (16 + 8 + 16 + 4)),  # 4 bits; a rotation stores nothing
    ],
)
def test_bytes_are_the_codecs_accounting(tiny_checkpoint, spec: str, per_token: int) -> None:
    llm = kivi_llm(tiny_checkpoint(D32), spec)
    method, model = llm.codec, llm.model_config
    assert isinstance(method, CacheMethod)
    codec_bytes = method.config.codec().bytes_per_token(1, model.num_kv_heads, model.head_dim)
    assert codec_bytes == per_token
    # max_position 1024 is whole residual windows: every token quantised
    assert method.bytes_per_token(1, model.num_kv_heads, model.head_dim) == per_token
    ids = torch.tensor(token_prompts([TOTAL, TOTAL], seed=12))
    _, executor = teacher_forced(llm, ids, torch.ones_like(ids, dtype=torch.bool), PROMPT)
    fp16 = 2 * model.kv_size * 2  # K and V of one token in fp16
    quantised = TOTAL // 32 * 32
    stored = quantised * per_token + (TOTAL - quantised) * fp16
    assert method.layer_bytes(TOTAL) == (stored, stored)
    # the tensors held and read, 2 sequences, 4 layers
    assert executor.nbytes() == executor.step_bytes()[0] == 2 * model.num_layers * stored


def test_more_bits_stay_closer_to_fp16(tiny_checkpoint) -> None:
    directory = tiny_checkpoint(D32)
    ids = torch.tensor(token_prompts([TOTAL], seed=13))
    valid = torch.ones_like(ids, dtype=torch.bool)
    exact, _ = teacher_forced(method_llm(directory), ids, valid, PROMPT)
    error = {}
    for spec in SPECS:
        logits, _ = teacher_forced(kivi_llm(directory, spec), ids, valid, PROMPT)
        error[spec[:5]] = (logits - exact).abs().mean().item()
    assert error["kivi4"] < 0.8 * error["kivi3"] < 0.8 * error["kivi2"], error


def test_kivi_settings_the_engine_cannot_run_fail_before_loading(tiny_checkpoint) -> None:
    model = kivi_llm(tiny_checkpoint(D32), "kivi4").model_config
    odd = dataclasses.replace(model, head_dim=48)  # not a power of two: no Hadamard rotation
    rotated = CacheConfig(kv_codec="kivi4", kv_codec_params=(("rotate", "v"), ("group_size", 16)))
    with pytest.raises(KvprError, match="power-of-two head_dim"):
        make_method(rotated, odd)
    make_method(dataclasses.replace(rotated, kv_codec_params=(("group_size", 16),)), odd)  # unrotated: fine
    with pytest.raises(KvprError, match="--recompute 0.5 is off for --kv-codec kivi3: K,V are stored at about 3 bits"):
        make_method(CacheConfig(offload=Offload.CPU, kv_codec="kivi3", recompute=0.5), model)
