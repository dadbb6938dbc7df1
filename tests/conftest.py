"""Shared test fixtures: tiny random checkpoints of every supported family (real HF directories),
engine builders, and synthetic hardware profiles."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpr.api import LLM
from kvpr.cli import main
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig
from kvpr.scheduler.cost_model import RateCurve
from kvpr.scheduler.profile import HardwareProfile

# name -> (transformers config class name, kwargs). Sizes are tiny; the options are the real ones.
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": (
        "LlamaConfig",
        dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            rope_theta=500000.0,
            tie_word_embeddings=False,
            eos_token_id=127,
            bos_token_id=1,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            eos_token_id=127,
            use_sliding_window=False,
        ),
    ),
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=128,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            eos_token_id=127,
            pad_token_id=1,
            bos_token_id=2,
        ),
    ),
    # head_dim 32: the smallest that KVO's and KIVI's 32-channel groups fit (the others have 16)
    "llama-d32": (
        "LlamaConfig",
        dict(
            vocab_size=128,
            hidden_size=128,
            intermediate_size=160,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            eos_token_id=127,
            bos_token_id=1,
        ),
    ),
    "opt-350m-style": (
        "OPTConfig",
        dict(
            vocab_size=128,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            eos_token_id=127,
            pad_token_id=1,
            bos_token_id=2,
        ),
    ),
}


def make_hf_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A transformers model of a tiny config with weights large enough to give decisive logits."""
    import transformers

    class_name, kwargs = TINY_CONFIGS[name]
    config = getattr(transformers, class_name)(**kwargs)
    model_class = transformers.AutoModelForCausalLM.from_config
    torch.manual_seed(seed)
    model = model_class(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith("norm.weight") or "layer_norm.weight" in param_name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> directory holding config.json + model.safetensors (made once per session)."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            directory = tmp_path_factory.mktemp(name)
            make_hf_model(name).save_pretrained(directory)
            made[name] = directory
        return made[name]

    return make


def cli_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``kvpr argv`` and return its one error line: exit 2, one ``kvpr: error:`` line, no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvpr: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def make_llm(*args: Any, **kwargs: Any) -> LLM:
    """An engine of ``make_config(*args, **kwargs)``."""
    return LLM(make_config(*args, **kwargs))


def make_config(
    model: str | Path | None,
    offload: str = "none",
    recompute: Any = "off",
    overlap: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    dummy_weights: bool = False,
    gpu_resident: int | str = 0,
    flush_block: int | None = None,
    slot_tokens: int | None = None,
    tensor_parallel: int = 1,
    kv_codec: str = "none",
    x_codec: str = "none",
    cuda_graph: bool = True,
) -> EngineConfig:
    """Small flush blocks and ring slots by default, so short test prompts flush the GPU tail to the
    host and cross several ring slots per layer: 4 and 3 tokens on the tiny checkpoints, 16 and 64
    on the default model (``model`` None), whose tests run contexts of hundreds of tokens."""
    default_model = model is None
    return EngineConfig(
        model=None if model is None else str(model),
        dummy_weights=dummy_weights,
        cache=CacheConfig(
            offload=Offload(offload),
            recompute=recompute,
            gpu_resident=gpu_resident,
            kv_codec=kv_codec,
            x_codec=x_codec,
        ),
        runtime=RuntimeConfig(
            device=device,
            dtype=dtype,
            overlap=overlap,
            num_chunks=3,
            flush_block=flush_block or (16 if default_model else 4),
            slot_tokens=slot_tokens or (64 if default_model else 3),
            tensor_parallel=tensor_parallel,
            cuda_graph=cuda_graph,
        ),
    )


def cpu_llm(model: str | Path | None, offload: str = "none", recompute: Any = "off", overlap: bool = True) -> LLM:
    """An fp32 CPU engine (exact arithmetic, as CI runs it)."""
    return make_llm(model, offload, recompute, overlap)


def method_llm(
    directory: str | Path | None, codec: str = "none", offload: str = "none", params: Any = (), recompute: Any = "off"
) -> LLM:
    """An fp32 CPU engine with a ``--kv-codec`` (a cache method's knobs as (field, value) pairs)."""
    return LLM(
        EngineConfig(
            model=None if directory is None else str(directory),
            cache=CacheConfig(offload=Offload(offload), kv_codec=codec, kv_codec_params=params, recompute=recompute),
            runtime=RuntimeConfig(device="cpu", dtype="float32"),
        )
    )


def token_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Seeded random token-id prompts of the given lengths (ids 2..119 fit every tiny vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 120, (n,), generator=gen).tolist() for n in lengths]


def teacher_forced(llm: LLM, ids: torch.Tensor, valid: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, Any]:
    """Logits at the prompt's last position and at every later one fed ``ids``; and the executor."""
    executor = llm.make_executor(ids.shape[0], ids.shape[1])
    logits = [executor.prefill(ids[:, :prompt_len], valid[:, :prompt_len])[:, -1]]
    logits += [executor.decode(ids[:, t]) for t in range(prompt_len, ids.shape[1])]
    return torch.stack(logits), executor


MIB = 1 << 20


def synthetic_profile(
    h2d: list[tuple[float, float]],
    gemm: list[tuple[float, float]],
    hidden: int = 4096,
    kv_width: int = 8192,
    attention: tuple[tuple[int, float], ...] = ((1024, 1e-4), (4096, 3e-4)),
) -> HardwareProfile:
    return HardwareProfile(
        device_name="synthetic",
        torch_version="0",
        h2d=RateCurve.from_points(h2d),
        d2h=RateCurve.from_points(h2d),
        gemm=RateCurve.from_points(gemm),
        gemm_hidden=hidden,
        gemm_kv_width=kv_width,
        batch_size=32,
        attention=attention,
        decode_layer_s=2e-3,
        created="2025-01-01T00:00:00+00:00",
    )


# The DESIGN section 1 figures of the H100 host, written out here as test data.
H100 = synthetic_profile([(MIB, 28e9), (8 * MIB, 49e9), (256 * MIB, 55e9)], [(256, 355e12), (4096, 720e12)])


def kvo_keys_values(t: int, b: int, n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with outlier channels, plain values, [t, b, n, d] float32 (KVO's tests)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(t, b, n, d, generator=gen) * (1 + 4 * torch.rand(d, generator=gen)) + 0.5
    return k, torch.randn(t, b, n, d, generator=gen)


def kvo_shape(max_len: int, b: int = 2, n: int = 2, d: int = 64) -> Any:
    """One layer's float32 cache shape for KVO's tests."""
    from kvpr.cache.storage import CacheShape

    return CacheShape(1, max_len, b, n, d, n * d, torch.float32)


def assert_kvo_cache_follows_reference(
    cfg: Any, scores: torch.Tensor, on_host: bool, atol: float, scores_atol: float | None
) -> None:
    """The runtime's KVOCache against the tested ``KVOLayerState`` over 200 prompt tokens and 60
    decode steps (2 rows, the second left-padded by 64, GQA with 3 query heads per KV head): the
    same chunks selected at every step, outputs within ``atol``, the recent tokens' fed-back scores
    equal (``scores_atol`` None) or within ``scores_atol``, and the same chunk and recent counts."""
    from kvpr.cache.rows import GatherStaging
    from kvpr.compress.kvo_state import KVOLayerState
    from kvpr.runtime.kvo_cache import KVOCache
    from kvpr.runtime.layer_caches import decode_attention

    k, v = kvo_keys_values(260, 2, 2, 64, seed=3)
    valid = torch.ones(260, 2, dtype=torch.bool)
    valid[:64, 1] = False
    reference = KVOLayerState(cfg, 2, 2, 64, dtype=torch.float32)
    cache = KVOCache(cfg, kvo_shape(300), torch.device("cpu"), on_host, staging=GatherStaging(False))
    reference.append(k[:200], v[:200], scores[:200], valid[:200])
    cache.prefill(k[:200], v[:200], valid[:200], scores[:200])
    reference.check_integrity()
    gen = torch.Generator().manual_seed(4)
    for step in range(200, 260):
        q = torch.randn(2, 6, 64, generator=gen)  # 3 query heads per KV head
        out = cache.decode(q, k[step], v[step])
        reference.append(k[step : step + 1], v[step : step + 1])
        selected = reference.select_chunks(q)
        assert torch.equal(cache.select(q), selected)
        keys, values, mask = reference.gather(selected)
        expected, probs = decode_attention(q, keys.float(), values.float(), mask, need_probs=True)
        reference.accumulate_scores(probs[..., -reference.recent_len :].reshape(2, 6, -1))
        torch.testing.assert_close(out, expected, rtol=0, atol=atol)
        recent = cache.recent_scores[: cache.recent_len]
        if scores_atol is None:
            assert torch.equal(recent, reference.recent_scores)
        else:
            torch.testing.assert_close(recent, reference.recent_scores, rtol=0, atol=scores_atol)
    assert cache.num_chunks == reference.num_chunks and cache.recent_len == reference.recent_len
    reference.check_integrity()
