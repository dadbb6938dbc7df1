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
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvpr.config import ModelConfig
from kvpr.device import dtype_name
from kvpr.errors import KvprError
from kvpr.models.base import DecoderModel
from kvpr.models.packaged import PACKAGED_MODELS
from kvpr.models.registry import BUILTIN_CONFIGS, model_class

if TYPE_CHECKING:
    from kvpr.parallel import WeightShard

DEFAULT_MODEL = "smollm2-135m"
# Old checkpoints carry these buffers; kvpr recomputes them.
# Where one loaded tensor goes: (parameter name, tensor) -> the tensor the parameter should hold.
Place = Callable[[str, torch.Tensor], torch.Tensor]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")
# GGUF ``general.architecture`` values whose transformers conversion kvpr runs (llama.cpp files
# Mistral models as "llama"; OPT has no GGUF).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2")


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


def resolve_source(name: str | None, dummy_weights: bool, dtype: torch.dtype | None = None) -> ModelSource:
    """Turn ``--model`` into a source. None is the built-in default model (real weights). ``dtype``:
    the run's, which picks a GGUF's converted copy (``gguf_to_safetensors``); None: any copy."""
    if name is None:
        name = DEFAULT_MODEL
    if name in PACKAGED_MODELS and not dummy_weights:
        return _hf_directory(packaged_model_dir(name, dtype), name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _hf_directory(path, name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise KvprError(f"GGUF file {name} does not exist: check the path")
        return _hf_directory(gguf_to_safetensors(path, dtype), name)
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


def packaged_model_dir(name: str, dtype: torch.dtype | None = None) -> Path:
    """A model shipped by PyPI data packages (``kvpr.models.packaged``), converted once to safetensors."""
    return gguf_to_safetensors(PACKAGED_MODELS[name].path(cache_root() / "gguf"), dtype)


def gguf_to_safetensors(gguf: Path, dtype: torch.dtype | None = None) -> Path:
    """Dequantize a GGUF file once (through transformers) and cache it as a safetensors directory,
    after checking its header (``inspect_gguf``). The copy reloads in about a second instead of 10-20 s.

    Precision: an fp32 run (``dtype``) gets an fp32 copy, since a dequantised Q4 weight (``d * q + m``
    in fp32) is in general no fp16 number (most of SmolLM2's Q4_1 weights are not) and the CPU fp32
    path stays bit-exact with transformers reading the GGUF itself. Any other run gets the file's
    precision class (fp16; bf16 for a bf16 file), a half or less of fp32, upcast or cast at load as
    any checkpoint is. ``dtype=None`` (only the config is read) takes any copy there is.
    """
    copies = {p: _gguf_copy_dir(gguf, p) for p in (torch.float16, torch.bfloat16, torch.float32)}
    ready = [p for p, directory in copies.items() if (directory / "model.safetensors").is_file()]
    usable = ready if dtype is None else [p for p in ready if (p == torch.float32) == (dtype == torch.float32)]
    if usable:
        return copies[usable[0]]
    precision = inspect_gguf(gguf)
    stored = torch.float32 if dtype == torch.float32 else precision
    target = copies[stored]
    if stored in ready:
        return target
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=stored)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as err:
        raise KvprError(
            f"converting {gguf} needs {err.name or err}: pip install transformers gguf accelerate"
        ) from None
    except Exception as err:  # transformers' conversion raises many types for a file it cannot read
        raise KvprError(
            f"transformers could not convert {gguf} ({type(err).__name__}: {_first_line(err)}): "
            "re-download the file, or convert the model again with llama.cpp"
        ) from None
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    state = {name: tensor.to(stored).contiguous() for name, tensor in hf_model.state_dict().items()}
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


def _gguf_copy_dir(gguf: Path, precision: torch.dtype) -> Path:
    """Where the converted copy of ``gguf`` in ``precision`` lives: keyed by the file (path, size,
    mtime) and by the transformers version that converts it (under 5.2 the converted tokenizer adds a
    start token and ends on id 1, so another version's copy would silently change every prompt)."""
    try:
        import transformers
    except ImportError:
        raise KvprError("reading GGUF needs transformers: pip install transformers gguf accelerate") from None
    stat = gguf.stat()
    ident = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:transformers-{transformers.__version__}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}-{dtype_name(precision)}"


def inspect_gguf(path: Path) -> torch.dtype:
    """Check a GGUF file before converting it, and return its precision class (bf16 for bf16 weights,
    fp32 for an all-fp32 file, else fp16: fp16 and every quantised type). The architecture comes from
    the header alone, so an unsupported model is refused in milliseconds, not after a conversion;
    then the tensor table must lie whole inside the file (a cut or half-written copy does not)."""
    architecture = gguf_architecture(path)
    if architecture not in GGUF_ARCHITECTURES:
        raise KvprError(
            f"{path} holds a {architecture!r} model; kvpr runs the GGUF architectures "
            f"{', '.join(GGUF_ARCHITECTURES)}: use a model of one of those"
        )
    if importlib.util.find_spec("gguf") is None:
        raise KvprError("reading GGUF needs the gguf package: pip install gguf accelerate")
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(str(path)).tensors
        end = max(tensor.data_offset + tensor.n_bytes for tensor in tensors)
    except Exception as err:  # the reader raises ValueError, IndexError... for a cut or corrupt file
        raise _damaged(path, "GGUF", err) from None
    if end > path.stat().st_size:
        raise _damaged(path, "GGUF", f"its tensors end at byte {end}, the file at {path.stat().st_size}")
    matrices = {tensor.tensor_type.name for tensor in tensors if len(tensor.shape) > 1}  # norms are F32 anyway
    if "BF16" in matrices:
        return torch.bfloat16
    return torch.float32 if matrices <= {"F32"} else torch.float16


# GGUF value types (gguf-py's GGUFValueType) -> size in bytes; 8 is a string, 9 an array.
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from a GGUF header's key-value pairs (llama.cpp writes it first),
    read without touching the tensor table. Raises a KvprError for a file that is not GGUF."""
    try:
        with path.open("rb") as handle:
            magic, version, _num_tensors, num_kv = struct.unpack("<4sIQQ", _read_exact(handle, 24))
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"no GGUF v2/v3 header: it starts with {magic!r}, version {version}")
            for _ in range(num_kv):
                key = _gguf_string(handle)
                (kind,) = struct.unpack("<I", _read_exact(handle, 4))
                if key == "general.architecture" and kind == _GGUF_STRING:
                    return _gguf_string(handle)
                _skip_gguf_value(handle, kind)
    except (OSError, ValueError, struct.error) as err:  # UnicodeDecodeError is a ValueError
        raise _damaged(path, "GGUF", err) from None
    raise _damaged(path, "GGUF", "its header has no general.architecture")


def _read_exact(handle: IO[bytes], size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return data


def _gguf_string(handle: IO[bytes]) -> str:
    (length,) = struct.unpack("<Q", _read_exact(handle, 8))
    if length > 1 << 20:
        raise ValueError(f"a header string claims {length} bytes")
    return _read_exact(handle, length).decode("utf-8")


def _skip_gguf_value(handle: IO[bytes], kind: int) -> None:
    """Seek past one value (a seek past the end shows at the next read)."""
    if kind in _GGUF_SCALAR_BYTES:
        handle.seek(_GGUF_SCALAR_BYTES[kind], os.SEEK_CUR)
    elif kind == _GGUF_STRING:
        handle.seek(struct.unpack("<Q", _read_exact(handle, 8))[0], os.SEEK_CUR)
    elif kind == _GGUF_ARRAY:
        item_kind, count = struct.unpack("<IQ", _read_exact(handle, 12))
        if item_kind in _GGUF_SCALAR_BYTES:
            handle.seek(count * _GGUF_SCALAR_BYTES[item_kind], os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_gguf_value(handle, item_kind)
    else:
        raise ValueError(f"unknown value type {kind} in the header")


def _first_line(err: object) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else type(err).__name__


def _damaged(path: Path, kind: str, err: object) -> KvprError:
    """The one-line error of a model file that cannot be read as ``kind``."""
    return KvprError(
        f"{path} is not a valid {kind} file (truncated or corrupt: {_first_line(err)}): re-copy, "
        "re-download or re-convert it"
    )


def build_model(cfg: ModelConfig) -> DecoderModel:
    """The model with every parameter on the meta device (no memory yet)."""
    with torch.device("meta"):
        return model_class(cfg)(cfg)


def load_weights(
    model: DecoderModel,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    place: Place | None = None,
    shard: WeightShard | None = None,
) -> None:
    """Fill every parameter from the checkpoint files, converting as each tensor is read
    (``place``: where each tensor goes instead of ``device``, e.g. throughput mode's tiers;
    ``shard``: a tensor-parallel rank keeps only its slice of each tensor)."""
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
        if shard is not None:
            tensor = shard.slice(name, tensor)
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
    model: DecoderModel,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    place: Place | None = None,
    shard: WeightShard | None = None,
) -> None:
    """Random weights of the real shapes, made on ``device`` in the target dtype one tensor at a
    time (``place`` then moves each to its home, so the device never holds more than one). With
    ``shard`` each tensor is drawn at its full shape and cut, so a tensor-parallel rank holds
    exactly its slice of the single-process model's weights."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tied = model.tied_parameters()
    values: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if name in tied:
            continue
        shape = param.shape if shard is None else shard.full_shape(name)
        tensor = torch.empty(shape, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        elif name.endswith(".bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        if shard is not None:
            tensor = shard.slice(name, tensor)
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
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)
            except SafetensorError as err:  # a cut copy: "incomplete metadata, file not fully covered"
                raise _damaged(file, "safetensors", err) from None
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
