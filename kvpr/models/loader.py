"""Weights: Hugging Face directories (safetensors or .bin, sharded or not), GGUF files, dummy weights.

The model is built on the meta device and every tensor is created or loaded straight into the
target dtype and device, so a 30B model never takes an fp32 detour. Loading is strict: every
checkpoint tensor must be used and every parameter filled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvpr.config import ModelConfig
from kvpr.errors import KvprError
from kvpr.models.base import DecoderModel
from kvpr.models.packaged import PACKAGED_MODELS
from kvpr.models.registry import BUILTIN_CONFIGS, model_class

DEFAULT_MODEL = "smollm2-135m"
# Old checkpoints carry these buffers; kvpr recomputes them.
# Where one loaded tensor goes: (parameter name, tensor) -> the tensor the parameter should hold.
Place = Callable[[str, torch.Tensor], torch.Tensor]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a HF directory, or a built-in config (dummy weights only)."""

    name: str
    hf_config: dict[str, Any]
    directory: Path | None  # holds config.json, weights and (maybe) tokenizer files

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.hf_config)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvpr"


def resolve_source(name: str | None, dummy_weights: bool) -> ModelSource:
    """Turn ``--model`` into a source. None is the built-in default model (real weights)."""
    if name is None:
        name = DEFAULT_MODEL
    if name in PACKAGED_MODELS and not dummy_weights:
        return _hf_directory(packaged_model_dir(name), name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _hf_directory(path, name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KvprError(f"GGUF file {name} does not exist: check the path")
        return _hf_directory(gguf_to_safetensors(path), name)
    if name in BUILTIN_CONFIGS:
        if not dummy_weights:
            raise KvprError(
                f"built-in model {name!r} has no weights here: add --dummy-weights for random "
                "weights of its real configuration, or pass a local checkpoint directory"
            )
        return ModelSource(name=name, hf_config=BUILTIN_CONFIGS[name], directory=None)
    known = ", ".join(sorted(set(BUILTIN_CONFIGS) | set(PACKAGED_MODELS)))
    raise KvprError(f"model {name!r} not found: pass a directory with config.json, a .gguf file, or one of {known}")


def _hf_directory(path: Path, name: str) -> ModelSource:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise KvprError(f"model directory {path} has no config.json: point --model at a HF checkpoint")
    try:
        hf_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KvprError(f"{config_path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    if not isinstance(hf_config, dict):
        raise KvprError(f"{config_path} does not hold a JSON object: the file is malformed")
    return ModelSource(name=name, hf_config=hf_config, directory=path)


def packaged_model_dir(name: str) -> Path:
    """A model shipped by PyPI data packages (``kvpr.models.packaged``), converted once to safetensors."""
    return gguf_to_safetensors(PACKAGED_MODELS[name].path(cache_root() / "gguf"))


def gguf_to_safetensors(gguf: Path) -> Path:
    """Dequantize a GGUF file once (through transformers) and cache it as a safetensors directory.

    The cached copy reloads in about a second instead of 10-20 s of dequantization.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (target / "model.safetensors").is_file():
        return target
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise KvprError("reading GGUF needs transformers: pip install transformers gguf accelerate") from None
    if importlib.util.find_spec("gguf") is None:
        raise KvprError("reading GGUF needs the gguf package: pip install gguf accelerate")
    hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    state = {name: tensor.contiguous() for name, tensor in hf_model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    save_file(state, str(staging / "model.safetensors"))
    (staging / "config.json").write_text(json.dumps(config, indent=1, default=str))
    tokenizer.save_pretrained(str(staging))
    if target.exists():  # another process won the race
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    return target


def build_model(cfg: ModelConfig) -> DecoderModel:
    """The model with every parameter on the meta device (no memory yet)."""
    with torch.device("meta"):
        return model_class(cfg)(cfg)


def load_weights(
    model: DecoderModel, source: ModelSource, device: torch.device, dtype: torch.dtype, place: Place | None = None
) -> None:
    """Fill every parameter from the checkpoint files, converting as each tensor is read
    (``place``: where each tensor goes instead of ``device``, e.g. throughput mode's tiers)."""
    assert source.directory is not None
    params = dict(model.named_parameters())
    tied = model.tied_parameters()
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in _checkpoint_tensors(source.directory):
        name = _normalise_name(name, params)
        if name.endswith(_IGNORED_SUFFIXES) or (name in tied and name not in loaded):
            continue
        if name not in params:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise KvprError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(params[name].shape)}: the weights do not match the config"
            )
        loaded[name] = place(name, tensor) if place else tensor.to(device=device, dtype=dtype)
    missing = [n for n in params if n not in loaded and n not in tied]
    if missing or unexpected:
        raise KvprError(
            f"checkpoint in {source.directory} does not match its config: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]})"
        )
    _assign(model, loaded, tied)


def init_dummy_weights(
    model: DecoderModel, device: torch.device, dtype: torch.dtype, seed: int, place: Place | None = None
) -> None:
    """Random weights of the real shapes, made on ``device`` in the target dtype one tensor at a
    time (``place`` then moves each to its home, so the device never holds more than one)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tied = model.tied_parameters()
    values: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name in tied:
            continue
        tensor = torch.empty(param.shape, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        values[name] = place(name, tensor) if place else tensor
    _assign(model, values, tied)


def _assign(model: DecoderModel, values: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    for alias, source in tied.items():
        values[alias] = values[source]
    model.load_state_dict(values, strict=True, assign=True)
    for alias, source in tied.items():  # keep one shared Parameter, not two copies
        module_name, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))


def _normalise_name(name: str, params: dict[str, Any]) -> str:
    """OPT checkpoints sometimes omit the ``model.`` prefix."""
    if name not in params and f"model.{name}" in params:
        return f"model.{name}"
    return name


def _checkpoint_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        return
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise KvprError(
            f"model directory {directory} has no *.safetensors or pytorch_model*.bin weights: "
            "add them, or use --dummy-weights"
        )
    for file in files:
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt pickle
            raise KvprError(
                f"cannot read {file}: {type(err).__name__}; the file is corrupt or not a checkpoint"
            ) from None
        yield from state.items()
