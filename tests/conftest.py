"""Tiny random checkpoints of every supported family, written as real HF directories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpr.api import LLM
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig

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


def make_llm(
    model: str | Path | None,
    offload: str = "none",
    recompute: Any = "off",
    overlap: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
    dummy_weights: bool = False,
    gpu_resident: int | str = 0,
) -> LLM:
    return LLM(
        EngineConfig(
            model=None if model is None else str(model),
            dummy_weights=dummy_weights,
            cache=CacheConfig(offload=Offload(offload), recompute=recompute, gpu_resident=gpu_resident),
            runtime=RuntimeConfig(device=device, dtype=dtype, overlap=overlap, num_chunks=3),
        )
    )


def cpu_llm(model: str | Path | None, offload: str = "none", recompute: Any = "off", overlap: bool = True) -> LLM:
    """An fp32 CPU engine (exact arithmetic, as CI runs it)."""
    return make_llm(model, offload, recompute, overlap)
