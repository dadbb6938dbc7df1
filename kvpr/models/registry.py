"""Architecture -> model class, and the built-in configurations of real models (for dummy weights)."""

from __future__ import annotations

from typing import Any

from kvpr.config import Arch, ModelConfig
from kvpr.errors import KvprError
from kvpr.models.base import DecoderModel
from kvpr.models.llama import LlamaModel
from kvpr.models.opt import OPTModel

_MODEL_CLASSES: dict[Arch, type[DecoderModel]] = {Arch.LLAMA: LlamaModel, Arch.OPT: OPTModel}


def _opt(hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return {
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": 4 * hidden,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "word_embed_proj_dim": hidden,
        "activation_function": "relu",
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "enable_bias": True,
        "tie_word_embeddings": True,
    }


def _llama(**overrides: Any) -> dict[str, Any]:
    base = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
    return base | overrides


_LLAMA_3_8B = _llama(
    intermediate_size=14336,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    bos_token_id=128000,
    eos_token_id=128001,
)

# config.json contents of the published checkpoints (only the keys kvpr reads).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "opt-125m": _opt(768, 12, 12),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "llama-2-7b": _llama(),
    "llama-3-8b": _LLAMA_3_8B,
    # Llama 3.1: Llama 3's shapes with llama3 RoPE scaling to 128K positions (the GQA long-context rows)
    "llama-3.1-8b": _LLAMA_3_8B
    | {
        "max_position_embeddings": 131072,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "eos_token_id": [128001, 128008, 128009],
    },
    "mistral-7b": _llama(
        model_type="mistral",
        intermediate_size=14336,
        num_key_value_heads=8,
        vocab_size=32768,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        sliding_window=None,
    ),
    "qwen2-7b": _llama(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151643,
        use_sliding_window=False,
    ),
    "smollm2-135m": _llama(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        eos_token_id=2,
        bos_token_id=1,
    ),
}


def builtin_config(name: str) -> ModelConfig:
    if name not in BUILTIN_CONFIGS:
        known = ", ".join(BUILTIN_CONFIGS)
        raise KvprError(f"unknown built-in model {name!r}: use one of {known}, or a model directory")
    return ModelConfig.from_hf(BUILTIN_CONFIGS[name])


def model_class(cfg: ModelConfig) -> type[DecoderModel]:
    return _MODEL_CLASSES[cfg.arch]
