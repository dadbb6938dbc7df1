"""Frozen configuration dataclasses, built once (from the CLI or kwargs) and passed down.

Every value is checked in ``__post_init__`` so a bad flag fails with one clear line before any
weight is loaded or any memory is allocated.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvpr.errors import KvprError
from kvpr.throughput_config import ThroughputConfig


class Arch(str, enum.Enum):
    """Model families kvpr implements (one file each under kvpr/models)."""

    LLAMA = "llama"
    OPT = "opt"


# HF ``model_type`` values and the family that runs them.
_MODEL_TYPES: dict[str, Arch] = {
    "llama": Arch.LLAMA,
    "mistral": Arch.LLAMA,
    "qwen2": Arch.LLAMA,
    "opt": Arch.OPT,
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base, and the optional scaling of Llama 3 (``llama3``) or ``linear``."""

    theta: float = 10000.0
    scaling_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.scaling_type not in ("default", "linear", "llama3"):
            raise KvprError(
                f"unsupported rope scaling '{self.scaling_type}': kvpr implements default, "
                "linear and llama3; use a model with one of those"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of one decoder-only model, read from a Hugging Face ``config.json``."""

    arch: Arch
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Llama family
    rope: RopeConfig = field(default_factory=RopeConfig)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # OPT
    word_embed_proj_dim: int | None = None
    pre_layer_norm: bool = True
    final_layer_norm: bool = True
    linear_bias: bool = True
    layer_norm_affine: bool = True
    activation: str = "silu"

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise KvprError(
                f"num_attention_heads={self.num_q_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}: fix the model's config.json"
            )
        for name in ("vocab_size", "hidden_size", "num_layers", "head_dim", "max_position"):
            if getattr(self, name) <= 0:
                raise KvprError(f"model config has {name}={getattr(self, name)}: must be > 0")

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Elements of K (or V) per token per layer: ``n_kv * d``."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json`` (transformers 4.x or 5.x keys)."""
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPES:
            supported = ", ".join(sorted(_MODEL_TYPES))
            raise KvprError(f"unsupported architecture model_type={model_type!r}: kvpr runs {supported}")
        arch = _MODEL_TYPES[model_type]
        try:
            return _from_hf_opt(hf) if arch is Arch.OPT else _from_hf_llama(hf, model_type)
        except KeyError as missing:
            raise KvprError(
                f"config.json of model_type={model_type!r} lacks the key {missing}: "
                "the file is malformed or from another architecture"
            ) from None


def _eos_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_from_hf(hf: Mapping[str, Any]) -> RopeConfig:
    # transformers 5 writes ``rope_parameters`` (theta inside); 4.x ``rope_theta`` + ``rope_scaling``.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling_type = params.get("rope_type", params.get("type", "default")) or "default"
    return RopeConfig(
        theta=theta,
        scaling_type=scaling_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(params.get("original_max_position_embeddings", 8192)),
    )


def _from_hf_llama(hf: Mapping[str, Any], model_type: str) -> ModelConfig:
    num_q_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    use_window = hf.get("use_sliding_window", model_type == "mistral")
    window = hf.get("sliding_window") if use_window else None
    if hf.get("hidden_act", "silu") != "silu":
        raise KvprError(f"unsupported hidden_act={hf.get('hidden_act')!r}: kvpr's Llama MLP is SwiGLU")
    return ModelConfig(
        arch=Arch.LLAMA,
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_q_heads=num_q_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_q_heads),
        head_dim=int(hf.get("head_dim") or hidden // num_q_heads),
        max_position=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        rope=_rope_from_hf(hf),
        qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=int(window) if window else None,
        activation="silu",
    )


def _from_hf_opt(hf: Mapping[str, Any]) -> ModelConfig:
    hidden = int(hf["hidden_size"])
    num_heads = int(hf["num_attention_heads"])
    activation = hf.get("activation_function", "relu")
    if activation not in ("relu", "gelu"):
        raise KvprError(f"unsupported OPT activation_function={activation!r}: use relu or gelu")
    proj_dim = int(hf.get("word_embed_proj_dim") or hidden)
    pre_ln = bool(hf.get("do_layer_norm_before", True))
    return ModelConfig(
        arch=Arch.OPT,
        model_type="opt",
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["ffn_dim"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_q_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=hidden // num_heads,
        max_position=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=1e-5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
        word_embed_proj_dim=proj_dim,
        pre_layer_norm=pre_ln,
        final_layer_norm=pre_ln and not hf.get("_remove_final_layer_norm", False),
        linear_bias=bool(hf.get("enable_bias", True)),
        layer_norm_affine=bool(hf.get("layer_norm_elementwise_affine", True)),
        activation=activation,
    )


class Offload(str, enum.Enum):
    """Where the KV cache (and the stored layer inputs X) live between decode steps."""

    NONE = "none"  # on the compute device
    CPU = "cpu"  # host memory (pinned when CUDA is present), all but the GPU tier (--gpu-resident)
    AUTO = "auto"  # on the GPU where it fits, the overflow in host memory (CPU device: none)


RECOMPUTE_OFF = "off"
RECOMPUTE_AUTO = "auto"
# X chunks per layer where no cost model chooses them (a fixed --recompute F): few enough that
# issuing them costs the host less than the GPU spends on a layer (H200, opt-6.7b: 4 beat 8 and 16)
DEFAULT_NUM_CHUNKS = 4
THROUGHPUT_NUM_CHUNKS = 8  # per GPU batch in throughput mode unless --num-chunks is given (its measured setting)
# --kv-codec names run by runtime/compressed.py (kvpr.compress.methods), on the device or offloaded.
KIVI_METHODS: tuple[str, ...] = ("kivi2", "kivi3", "kivi4")  # one method (KiviConfig) at three widths
CACHE_METHODS: tuple[str, ...] = (*KIVI_METHODS, "kvo", "h2o", "streaming", "quest")


def check_codec_names(kv_codec: str, x_codec: str) -> None:
    """Reject names outside the codec registries first, so a typo is reported as one, not as a
    placement rule the name happens to break."""
    from kvpr.cache.codec import CODEC_NAMES, X_CODEC_NAMES  # the registries (torch-backed)

    kv_names = tuple(dict.fromkeys(("none", *CODEC_NAMES, *CACHE_METHODS)))
    if kv_codec not in kv_names:
        raise KvprError(f"unknown --kv-codec {kv_codec}: use one of {', '.join(kv_names)}")
    if x_codec not in X_CODEC_NAMES:
        raise KvprError(f"unknown --x-codec '{x_codec}': choose one of {', '.join(X_CODEC_NAMES)}")


def parse_resident(value: str) -> int | str:
    """``auto`` or a token count."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise KvprError(f"--gpu-resident {value!r}: use auto or a token count >= 0") from None


def parse_auto_count(value: str, flag: str, noun: str = "count") -> int | None:
    """``auto`` (None: chosen for the run) or a count >= 1 of flag ``flag`` (``noun`` names it)."""
    if value == "auto":
        return None
    try:
        count = int(value)
    except ValueError:
        raise KvprError(f"{flag} {value!r}: use auto or a {noun} >= 1") from None
    if count < 1:
        raise KvprError(f"{flag} {count}: must be >= 1 (or auto)")
    return count


def parse_num_chunks(value: str) -> int | None:
    """``auto`` (None: the scheduler chooses per step) or a chunk count >= 1."""
    return parse_auto_count(value, "--num-chunks", "chunk count")


def parse_recompute(value: str | float | None) -> str | float:
    """``off``, ``auto`` or a fraction F in [0, 1] (``l = round(F * s)``)."""
    if value is None:
        return RECOMPUTE_OFF
    if isinstance(value, str) and value in (RECOMPUTE_OFF, RECOMPUTE_AUTO):
        return value
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise KvprError(f"--recompute {value!r}: use off, auto or a fraction in [0, 1]") from None
    if not (0.0 <= fraction <= 1.0) or math.isnan(fraction):
        raise KvprError(f"--recompute {value}: the fraction must lie in [0, 1]")
    return fraction


@dataclass(frozen=True)
class CacheConfig:
    """KV placement and the recomputation policy."""

    offload: Offload = Offload.NONE
    recompute: str | float = RECOMPUTE_OFF
    kv_codec: str = "none"  # "none": K,V stored as computed; else a name of kvpr.cache.codec
    gpu_resident: int | str = 0  # oldest tokens whose K,V also stay on the GPU: N, or "auto"
    kv_codec_params: tuple[tuple[str, Any], ...] = ()  # a cache method's knobs, as (field, value) pairs
    x_codec: str = "none"  # how stored X is kept for recomputation: none (model dtype), int8, int4

    def __post_init__(self) -> None:
        check_codec_names(self.kv_codec, self.x_codec)
        if self.gpu_resident != "auto" and not (isinstance(self.gpu_resident, int) and self.gpu_resident >= 0):
            raise KvprError(f"--gpu-resident {self.gpu_resident!r}: use auto or a token count >= 0")
        if self.kv_codec_params and self.kv_codec not in CACHE_METHODS:
            raise KvprError(f"--kv-codec {self.kv_codec} takes no parameters: only {', '.join(CACHE_METHODS)} do")
        if self.kv_codec not in ("none", *CACHE_METHODS) and self.offload is not Offload.CPU:
            raise KvprError(
                f"--kv-codec {self.kv_codec} needs --offload cpu: codecs apply where the cache is "
                "written to the host tier"
            )
        if self.x_codec != "none":
            if self.kv_codec in CACHE_METHODS:
                raise KvprError(f"--x-codec applies to recomputation, which --kv-codec {self.kv_codec} never runs")
            if self.offload is Offload.NONE or self.recompute == RECOMPUTE_OFF:
                raise KvprError(
                    f"--x-codec {self.x_codec} needs --offload cpu|auto and --recompute auto|F: X is stored only "
                    "for recomputing K,V from it"
                )
        if not isinstance(self.offload, Offload):
            raise KvprError(f"offload={self.offload!r}: use Offload.NONE, Offload.CPU or Offload.AUTO")
        if parse_recompute(self.recompute) != self.recompute:
            raise KvprError(f"recompute={self.recompute!r}: use 'off', 'auto' or a float in [0, 1]")
        if self.offload is Offload.NONE and self.recompute not in (RECOMPUTE_OFF, RECOMPUTE_AUTO, 0.0):
            raise KvprError(
                f"--recompute {self.recompute} needs --offload cpu: with the cache on the "
                "compute device nothing is copied, so there is nothing to recompute"
            )

    @property
    def stores_inputs(self) -> bool:
        """Whether layer inputs X are kept beside K,V (needed whenever recomputation may run)."""
        return self.offload is not Offload.NONE and self.recompute != RECOMPUTE_OFF


@dataclass(frozen=True)
class RuntimeConfig:
    """How a plan is executed: device, dtype, overlap (the ablation switch and test oracle)."""

    device: str = "auto"
    dtype: str = "auto"
    overlap: bool = True
    num_chunks: int | None = None  # X chunks per layer in the recompute pipeline; None: chosen per step
    profile_path: str | None = None
    host_memory_gib: float | None = None  # host budget; None: what the OS reports available
    compile: bool = False  # fuse the cache method's decode kernels with torch.compile (CUDA, --kv-codec kvo)
    cuda_graph: bool = True  # replay decode steps as CUDA graphs (CUDA; kvpr.runtime.graphs says which)
    gpu_memory_gib: float | None = None  # GPU memory kvpr may use, weights included; None: what is free
    flush_block: int = 64  # new tokens kept on the GPU before they go to the host tier in one block
    slot_tokens: int | None = None  # tokens per ring slot of the offloaded executor; None: 32 MiB of K,V
    tensor_parallel: int = 1  # ranks splitting each layer's heads and MLP columns (kvpr.parallel)

    def __post_init__(self) -> None:
        if self.host_memory_gib is not None and not self.host_memory_gib > 0:
            raise KvprError(f"--host-memory-gib {self.host_memory_gib}: must be > 0")
        if self.flush_block < 1 or (self.slot_tokens is not None and self.slot_tokens < 1):
            raise KvprError(f"flush_block={self.flush_block}, slot_tokens={self.slot_tokens}: must be >= 1")
        if self.gpu_memory_gib is not None and not self.gpu_memory_gib > 0:
            raise KvprError(f"--gpu-memory-gib {self.gpu_memory_gib}: must be > 0")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise KvprError(f"--dtype {self.dtype!r}: use auto, float32, float16 or bfloat16")
        if self.num_chunks is not None and self.num_chunks < 1:
            raise KvprError(f"--num-chunks {self.num_chunks}: must be >= 1 (or auto)")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise KvprError(f"--tensor-parallel {self.tensor_parallel}: must be an integer >= 1")

    @property
    def step_graphs(self) -> bool:
        """Whether decode steps may be replayed as CUDA graphs (a tensor-parallel rank's step
        all-reduces between its layers: not captured)."""
        return self.cuda_graph and self.tensor_parallel == 1


@dataclass(frozen=True)
class SamplingParams:
    """Decoding controls. ``temperature == 0`` is greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise KvprError(f"--max-new-tokens {self.max_new_tokens}: must be >= 1")
        if self.temperature < 0 or math.isnan(self.temperature):
            raise KvprError(f"--temperature {self.temperature}: must be >= 0 (0 is greedy)")
        if not (0.0 < self.top_p <= 1.0):
            raise KvprError(f"--top-p {self.top_p}: must lie in (0, 1]")


@dataclass(frozen=True)
class EngineConfig:
    """Everything needed to build an engine: which model, where its cache lives, how to run."""

    model: str | None = None  # directory, .gguf file, built-in name, or None for the default
    dummy_weights: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    throughput: ThroughputConfig | None = None  # None: latency mode (weights on the compute device)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)
