"""KVO's knobs and their checks (the codec itself, its tensor layouts and the two knobs beyond the
paper are described in kvo.py): a config module of its own, so that the runtime, the sim, the
method registry and the fused encoder can name a KVO setting without importing the codec."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvpr.compress.packing import PACK_BITS, packed_len
from kvpr.compress.rotation import Rotated, check_rotation
from kvpr.errors import KvprError

V_NAMES: tuple[str, ...] = ("v_anchor_codes", "v_codes", "v_keep", "v_scale", "v_zero")
K_DIFF_RANGE: tuple[str, ...] = ("k_diff_scale", "k_diff_zero")
K_DIFF_AXES: tuple[str, ...] = ("token", "channel")
_TEXT_FIELDS = ("gqa_reduce", "k_diff_axis", "rotate")


@dataclass(frozen=True)
class KVOConfig(Rotated):
    """KVO knobs; the defaults are the authors' released configuration."""

    window: int = 64  # tokens finalised at a time; the recent window holds window..2*window-1
    chunk: int = 8  # tokens per chunk, the first (after reordering) is the anchor
    top_chunks: int = 48  # chunks attended per decode step, besides the recent window
    k_anchor_bits: int = 8
    k_diff_bits: int = 2
    k_keep: int = 8  # differences kept per channel group of a non-anchor key
    v_bits: int = 2
    v_anchor_bits: int = 4
    v_keep: int = 16  # values kept per token group of a channel, anchors included
    group: int = 32  # K channel group and V token group
    uncompressed_layers: int = 2  # the first layers stay fp16
    gqa_reduce: str = "max"  # combine the query heads of a KV head when scoring chunks: max|sum
    prefill_queries: int = 128  # a prompt token's score: attention from the next this-many queries
    k_diff_axis: str = "token"  # K differences' scales: per token (paper) | per channel over a V group
    rotate: str = "none"  # Hadamard-rotate none|k|v|kv over the head dimension before quantising

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in _TEXT_FIELDS and (not isinstance(value, int) or value < 0):
                raise KvprError(f"KVO {f.name} must be a non-negative int, not {value!r}")
        for name in ("k_anchor_bits", "k_diff_bits", "v_bits", "v_anchor_bits"):
            if getattr(self, name) not in PACK_BITS:
                raise KvprError(f"KVO {name}={getattr(self, name)}: use one of {PACK_BITS}")
        if min(self.window, self.chunk, self.top_chunks, self.group) <= 0:
            raise KvprError("KVO window, chunk, top_chunks and group must be positive")
        if self.group % self.chunk or self.window % self.group or self.group > 255:
            raise KvprError(
                f"KVO needs chunk ({self.chunk}) | group ({self.group}) | window ({self.window}) "
                "and group <= 255; pick sizes that divide each other"
            )
        if not 1 <= self.k_keep <= self.group:
            raise KvprError(f"KVO k_keep={self.k_keep} must be in [1, group={self.group}]")
        if not self.anchors_per_group <= self.v_keep <= self.group:
            raise KvprError(
                f"KVO v_keep={self.v_keep} must be in [{self.anchors_per_group} anchors, group={self.group}]"
            )
        if self.v_anchor_bits < self.v_bits:
            raise KvprError("KVO v_anchor_bits must be >= v_bits (anchors use a finer grid)")
        if self.gqa_reduce not in ("max", "sum"):
            raise KvprError(f"KVO gqa_reduce='{self.gqa_reduce}': use 'max' or 'sum'")
        if self.k_diff_axis not in K_DIFF_AXES:
            raise KvprError(f"KVO k_diff_axis='{self.k_diff_axis}': use one of {', '.join(K_DIFF_AXES)}")
        check_rotation(self.rotate)

    @classmethod
    def from_params(cls, **params: object) -> KVOConfig:
        """Build from keyword parameters, naming any unknown one in a KvprError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise KvprError(f"unknown KVO parameters {unknown}: use {sorted(known)}")
        return cls(**params)  # type: ignore[arg-type]

    @property
    def anchors_per_group(self) -> int:
        return self.group // self.chunk

    @property
    def order_bits(self) -> int:
        """Bits per stored in-chunk index (3 bits of information for chunk 8, packed as 4: the
        widths that divide a byte, as KVO's layout was measured with)."""
        return next(bits for bits in PACK_BITS if 8 % bits == 0 and (1 << bits) >= self.chunk)

    @property
    def per_channel(self) -> bool:
        """The K differences are quantised per channel (their scales live with the V group)."""
        return self.k_diff_axis == "channel"

    def group_names(self) -> tuple[str, ...]:
        """Encoded tensors indexed by V group (leading dim ``C / P``) rather than by chunk."""
        return V_NAMES + K_DIFF_RANGE if self.per_channel else V_NAMES

    def compresses_layer(self, layer: int) -> bool:
        """Layers before ``uncompressed_layers`` stay fp16 (dense, unpruned)."""
        return layer >= self.uncompressed_layers

    def window_nbytes(self, b: int, n_kv: int, d: int) -> int:
        """Bytes of one encoded window of ``b`` sequences: codes, scales, zeros, masks, order."""
        cfg, n_chunks = self, self.window // self.chunk
        non_anchors, groups = cfg.chunk - 1, d // cfg.group
        k_anchor = packed_len(d, cfg.k_anchor_bits) + 4 * groups
        k_range = 0 if cfg.per_channel else 4 * groups  # per channel: 4 * d per V group, below
        k_other = groups * packed_len(cfg.k_keep, cfg.k_diff_bits) + k_range + packed_len(d, 1)
        order = packed_len(cfg.chunk, cfg.order_bits)
        anchors = cfg.anchors_per_group
        v_group = (
            anchors * packed_len(d, cfg.v_anchor_bits)
            + (cfg.v_keep - anchors) * packed_len(d, cfg.v_bits)
            + (cfg.group - anchors) * packed_len(d, 1)
            + 4 * d
            + (4 * d if cfg.per_channel else 0)
        )
        per_head = n_chunks * (k_anchor + non_anchors * k_other + order)
        per_head += (cfg.window // cfg.group) * v_group
        return b * n_kv * per_head


def check_head_dim(d: int, cfg: KVOConfig) -> None:
    if d % cfg.group or d % 8:
        raise KvprError(f"KVO needs head_dim {d} to be a multiple of group {cfg.group} and of 8")
    check_rotation(cfg.rotate, d)
