"""The cache methods the compressed executor runs, their knobs, and how knobs arrive from flags.

KVO and KIVI compress every token; H2O and StreamingLLM keep a fixed budget of tokens (evicting the
rest); Quest keeps everything and reads a budget of pages per step. Each is a ``--kv-codec`` name
with a frozen config whose defaults are the ones in the method's paper; every field is also a flag
``--<method>-<field>`` (see :func:`add_knob_flags`) and an entry of ``name:field=value,...`` specs.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvpr.compress.kivi import KiviCodec
from kvpr.compress.kvo_config import KVOConfig
from kvpr.compress.rotation import check_rotation
from kvpr.config import KIVI_METHODS
from kvpr.errors import KvprError

Params = tuple[tuple[str, Any], ...]  # (field, value) pairs: hashable, so configs stay frozen


def _positive(method: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise KvprError(f"--{method}-{name.replace('_', '-')} {value!r}: must be a positive int")


@dataclass(frozen=True)
class KiviConfig:
    """KIVI (ICML 2024): 2-bit K per channel over token groups, V per token over channel groups;
    the newest tokens stay fp16 until ``residual`` of them are quantised together (paper: G=32, R=128).
    ``rotate`` (none, k, v, kv) Hadamard-rotates those parts before quantising (decode un-rotates).
    ``kivi3`` and ``kivi4`` are the same method at 3 and 4 bits (``bits`` is the name's, not a knob)."""

    bits: ClassVar[int] = 2
    group_size: int = 32  # V channels per scale
    token_group: int = 32  # K tokens per scale
    residual: int = 128  # fp16 window, quantised ``residual`` tokens at a time
    rotate: str = "none"

    def __post_init__(self) -> None:
        name = f"kivi{self.bits}"
        _positive(name, group_size=self.group_size, token_group=self.token_group, residual=self.residual)
        if self.residual % self.token_group:
            raise KvprError(f"--{name}-residual {self.residual} must be a multiple of token_group {self.token_group}")
        check_rotation(self.rotate)

    def codec(self) -> KiviCodec:
        """The codec that packs each block of ``token_group`` tokens."""
        return KiviCodec(self.bits, self.group_size, self.token_group, self.rotate)


@dataclass(frozen=True)
class Kivi3Config(KiviConfig):
    """KIVI at 3 bits (codes packed 8 to 3 bytes)."""

    bits: ClassVar[int] = 3


@dataclass(frozen=True)
class Kivi4Config(KiviConfig):
    """KIVI at 4 bits."""

    bits: ClassVar[int] = 4


@dataclass(frozen=True)
class H2OConfig:
    """H2O (NeurIPS 2023): keep ``budget`` tokens per head, the ``recent`` newest plus the heavy
    hitters with the largest accumulated attention; evict the lightest older one each step."""

    budget: int = 512
    recent: int = 256  # the paper splits the budget evenly between heavy hitters and recent tokens

    def __post_init__(self) -> None:
        _positive("h2o", budget=self.budget, recent=self.recent)
        if self.recent >= self.budget:
            raise KvprError(f"--h2o-recent {self.recent} must be below --h2o-budget {self.budget}")


@dataclass(frozen=True)
class StreamingConfig:
    """StreamingLLM (ICLR 2024): the first ``sink`` tokens (attention sinks) plus a window of the
    newest ``budget - sink`` tokens; everything in between is evicted."""

    budget: int = 512
    sink: int = 4

    def __post_init__(self) -> None:
        _positive("streaming", budget=self.budget, sink=self.sink)
        if self.sink >= self.budget:
            raise KvprError(f"--streaming-sink {self.sink} must be below --streaming-budget {self.budget}")

    @property
    def window(self) -> int:
        return self.budget - self.sink


@dataclass(frozen=True)
class QuestConfig:
    """Quest (ICML 2024): pages of ``page_size`` tokens with per-channel min/max keys; each step reads
    the pages with the largest upper bound of ``q . k`` within ``budget`` tokens (the newest page
    always). The first two layers stay dense, as in the paper."""

    budget: int = 512
    page_size: int = 16
    uncompressed_layers: int = 2
    gqa_reduce: str = "max"  # combine the query heads of a KV head when scoring pages: max|sum

    def __post_init__(self) -> None:
        _positive("quest", budget=self.budget, page_size=self.page_size)
        if self.budget < self.page_size:
            raise KvprError(f"--quest-budget {self.budget} must hold at least one page of {self.page_size}")
        if not isinstance(self.uncompressed_layers, int) or self.uncompressed_layers < 0:
            raise KvprError(f"--quest-uncompressed-layers {self.uncompressed_layers!r}: must be >= 0")
        if self.gqa_reduce not in ("max", "sum"):
            raise KvprError(f"--quest-gqa-reduce {self.gqa_reduce!r}: use max or sum")


METHOD_CONFIGS: dict[str, type] = {
    "kivi2": KiviConfig,
    "kivi3": Kivi3Config,
    "kivi4": Kivi4Config,
    "kvo": KVOConfig,
    "h2o": H2OConfig,
    "streaming": StreamingConfig,
    "quest": QuestConfig,
}
METHOD_NAMES: tuple[str, ...] = tuple(METHOD_CONFIGS)
OFFLOADABLE: tuple[str, ...] = (*KIVI_METHODS, "kvo")  # methods whose cache may live in host memory


def method_config(name: str, params: Sequence[tuple[str, Any]] | dict[str, Any] = ()) -> Any:
    """The frozen config of method ``name`` with ``params`` applied (unknown ones named in the error)."""
    if name not in METHOD_CONFIGS:
        raise KvprError(f"'{name}' is not a cache method: use one of {', '.join(METHOD_NAMES)}")
    cls = METHOD_CONFIGS[name]
    values = dict(params)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise KvprError(f"unknown {name} parameters {unknown}: use {sorted(known)}")
    return cls(**values)


def uncompressed_layers(config: Any) -> int:
    """Leading layers a method keeps dense (KVO and Quest: 2 by default; the others none)."""
    return int(getattr(config, "uncompressed_layers", 0))


def recent_window(name: str, config: Any) -> int:
    """Newest tokens a method always keeps and reads at full precision (its recent window): a needle
    there is found by any method, so an accuracy protocol keeps needles out of it. KVO's window holds
    up to ``2 * window - 1`` tokens; KIVI's fp16 residual up to ``residual``; H2O its ``recent``;
    StreamingLLM ``budget - sink``; Quest always reads the newest page."""
    if name == "kvo":
        return 2 * config.window - 1
    if name in KIVI_METHODS:
        return config.residual
    if name == "h2o":
        return config.recent
    if name == "streaming":
        return config.window
    if name == "quest":
        return config.page_size
    raise KvprError(f"'{name}' is not a cache method: use one of {', '.join(METHOD_NAMES)}")


def _coerce(cls: type, field: str, text: str) -> Any:
    default: Any = next(f.default for f in dataclasses.fields(cls) if f.name == field)
    try:
        return type(default)(text)
    except ValueError:
        raise KvprError(f"{field}={text!r}: expected a {type(default).__name__}") from None


def parse_codec_spec(spec: str) -> tuple[str, Params]:
    """``name`` or ``name:field=value,field=value`` -> (name, params), values typed by the config."""
    name, _, rest = spec.partition(":")
    if not rest:
        return name, ()
    if name not in METHOD_CONFIGS:
        raise KvprError(f"--codecs {spec}: only cache methods ({', '.join(METHOD_NAMES)}) take parameters")
    cls = METHOD_CONFIGS[name]
    known = sorted(f.name for f in dataclasses.fields(cls))
    params = []
    for item in rest.split(","):
        field, eq, value = item.partition("=")
        if not eq:
            raise KvprError(f"--codecs {spec}: write parameters as field=value, separated by commas")
        if field not in known:
            raise KvprError(f"--codecs {spec}: unknown {name} parameter {field!r}; use {known}")
        params.append((field, _coerce(cls, field, value)))
    method_config(name, params)  # validate now, before any model loads
    return name, tuple(params)


def _flag(method: str, field: str) -> str:
    return f"--{method}-{field.replace('_', '-')}"


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of every method config, default None (the method's own default)."""
    group = parser.add_argument_group("cache method knobs (with --kv-codec of the same name)")
    for method, cls in METHOD_CONFIGS.items():
        for f in dataclasses.fields(cls):
            group.add_argument(
                _flag(method, f.name),
                dest=f"knob_{method}_{f.name}",
                type=type(f.default),
                default=None,
                metavar=type(f.default).__name__.upper(),
                help=f"default {f.default}",
            )


def knob_params(args: argparse.Namespace, codec: str) -> Params:
    """The knobs set on the command line for ``codec``; a knob of another method is an error."""
    params = []
    for method, cls in METHOD_CONFIGS.items():
        for f in dataclasses.fields(cls):
            value = getattr(args, f"knob_{method}_{f.name}", None)
            if value is None:
                continue
            if method != codec:
                raise KvprError(f"{_flag(method, f.name)} applies to --kv-codec {method}, not {codec}")
            params.append((f.name, value))
    if params:
        method_config(codec, params)  # validate before any model loads
    return tuple(params)
