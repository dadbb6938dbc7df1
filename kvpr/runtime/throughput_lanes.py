"""Throughput mode's buffers: where a lane's cache lives and where its loads land.

A lane (one GPU batch of the block) keeps its cache on three tiers by token slot (``Lane``): the
GPU tier as computed, the CPU tier in pinned ``KVStorage``, the disk tier in one file per stored
part. A (layer, lane) unit's loads land in one of two device staging slots (``Staging``), which
hold the events the block schedule (``throughput``) orders them by. Every buffer is sized once for
the widest lane and viewed per lane (``flat_view``), so a token range stays contiguous.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvpr.cache.disk import DiskTensor
from kvpr.cache.storage import CacheShape, KVStorage, input_layout, token_layout
from kvpr.device import host_empty
from kvpr.runtime.batch import BatchState
from kvpr.runtime.streams import StreamSet
from kvpr.throughput_config import CacheSplit

if TYPE_CHECKING:
    from kvpr.cache.codec import KVCodec, XCodec
    from kvpr.config import ModelConfig
    from kvpr.models.base import Rope

Parts = dict[str, tuple[tuple[int, ...], torch.dtype]]  # stored part -> (shape of one token and row, dtype)


def part_layouts(
    cfg: "ModelConfig", dtype: torch.dtype, codec: "KVCodec | None", x_codec: "XCodec | None"
) -> tuple[Parts, Parts]:
    """The parts one token of one row stores, for K,V (``k``, ``v`` as computed, or the codec's) and
    for X (``x``, or the X codec's): each part of a tier is ``[L, slots, b, *shape]``."""
    one = CacheShape.for_model(cfg, 1, 1, dtype)
    kv = {"k": ((cfg.num_kv_heads, cfg.head_dim), dtype), "v": ((cfg.num_kv_heads, cfg.head_dim), dtype)}
    if codec is not None:
        kv = {name: (shape[1:], part_dtype) for name, (shape, part_dtype) in token_layout(codec, one).items()}
    x = {name: (shape[1:], part_dtype) for name, (shape, part_dtype) in input_layout(x_codec, one).items()}
    return kv, x


def flat_parts(parts: Parts, rows: int, device: torch.device, pin: bool | None) -> dict[str, torch.Tensor]:
    """One flat buffer per part for ``rows`` (tokens x batch rows); pinned host memory if ``pin`` is not None."""
    out = {}
    for name, (shape, part_dtype) in parts.items():
        numel = rows
        for size in shape:
            numel *= size
        if pin is None:
            out[name] = torch.empty(numel, dtype=part_dtype, device=device)
        else:
            out[name] = host_empty((numel,), part_dtype, pin)
    return out


def part_views(flat: dict[str, torch.Tensor], parts: Parts, lead: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``[t, b, *shape]`` views of flat part buffers."""
    return {name: flat_view(flat[name], (*lead, *parts[name][0])) for name in parts}


def flat_view(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous tensor of ``shape`` at the start of a flat buffer (one buffer serves lanes of
    any size, and token ranges stay contiguous)."""
    numel = 1
    for size in shape:
        numel *= size
    return flat[:numel].view(shape)


class Staging:
    """One of two device staging slots for a (layer, lane) unit, with the events ordering it."""

    def __init__(
        self,
        shape: CacheShape,
        split: CacheSplit,
        device: torch.device,
        streams: StreamSet,
        num_chunks: int,
        with_x: bool,
        kv_parts: Parts,
        x_parts: Parts,
        encoded: bool,
    ) -> None:
        kv = shape.max_len * shape.batch_size * shape.num_kv_heads * shape.head_dim
        self.k = torch.empty(kv, dtype=shape.dtype, device=device)  # flat; [s_max, b, n_kv, d] per lane
        self.v = torch.empty(kv, dtype=shape.dtype, device=device)
        b, pin = shape.batch_size, streams.enabled
        self.x = flat_parts(x_parts if with_x else {}, split.cpu * b, device, None)  # [c, b, ...] per part
        self.disk = flat_parts(kv_parts, split.disk * b, device, pin)  # pinned landing area of disk reads
        # a codec's parts of the CPU and disk tiers on the device, [c + disk, b, ...], decoded after landing
        self.enc = flat_parts(kv_parts if encoded else {}, (split.cpu + split.disk) * b, device, None)
        self.x_ready = [streams.event() for _ in range(num_chunks)]
        self.kv_ready = streams.event()
        self.free = streams.event()  # the unit that used this slot has finished its attention
        self.disk_copied = streams.event()  # disk_k/v copied to the device: may be refilled
        self.chunks: list[tuple[int, int]] = []  # X chunks (offsets in the CPU tier) of the queued load


class Lane:
    """One GPU batch of the block: its rows, batch state and the three tiers of its cache."""

    def __init__(
        self,
        rows: slice,
        cfg: "ModelConfig",
        split: CacheSplit,
        device: torch.device,
        dtype: torch.dtype,
        pin: bool,
        store_inputs: bool,
        directory: Path | None,
        codec: "KVCodec | None",
        x_codec: "XCodec | None",
    ) -> None:
        self.rows = rows
        b = rows.stop - rows.start
        self.batch = BatchState(b, split.max_len, device)
        kv_shape = (cfg.num_layers, split.gpu, b, cfg.num_kv_heads, cfg.head_dim)
        self.gpu_k = torch.empty(kv_shape, dtype=dtype, device=device) if split.gpu else None  # [L, g, b, n_kv, d]
        self.gpu_v = torch.empty(kv_shape, dtype=dtype, device=device) if split.gpu else None
        host_shape = CacheShape.for_model(cfg, b, split.cpu, dtype)
        self.host = KVStorage(host_shape, torch.device("cpu"), pin, store_inputs, codec, x_codec) if split.cpu else None
        kv_parts, _x_parts = part_layouts(cfg, dtype, codec, x_codec)
        self.disk: dict[str, DiskTensor] = {}  # part -> [L, disk, b, *shape]
        self.token_out: dict[str, torch.Tensor] = {}
        if split.disk:
            assert directory is not None
            for name, (shape, part_dtype) in kv_parts.items():
                path = directory / f"lane{rows.start}-{name}.bin"
                self.disk[name] = DiskTensor(path, (cfg.num_layers, split.disk, b, *shape), part_dtype)
                # Pinned landing area of each layer's new-token part on its way to disk.
                self.token_out[name] = host_empty((cfg.num_layers, 1, b, *shape), part_dtype, pin)
        self.rope_new: Rope = None
        self.rope_old: Rope = None
        self.mask: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start

    def close(self) -> None:
        """Remove the lane's disk files (the other tiers are freed with the lane)."""
        for file in self.disk.values():
            file.close()
