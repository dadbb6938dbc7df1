"""Fused GPU encode of KVO chunks: ``kvo.encode_chunks``'s tensors from one read of K and of V.

The torch path makes tens of whole-tensor passes over float32 copies (argsort, gathers, ranges,
sorts, scatters, packing); here each program reads its share of K (one kernel) or V (another) once:
the tokens of one V group (``P`` chunks) of one sequence and head, in a block of channels (``Tiles``)
so that its reductions stay inside a warp or two. It ranks each chunk's tokens by score, quantises,
picks the kept entries and writes the packed bytes. The V group is the unit of tokens because
``k_diff_axis=channel`` fits one range per channel over the group's non-anchors and V's ranges are
per group; K's channel blocks hold whole channel groups (its per-token ranges and picks are per
group), V's any channels (all of its work is per channel).

Bit-identical to the torch path (the tests hold every tensor ``torch.equal``): the float32
operations are the same, in the same order (the launch turns fp fusion off, so no multiply-add is
contracted; IEEE division; round half to even from ``floor``); ranges are min/max, which no order
changes; a chunk's order is a rank counted by comparison, and the kept entries are those above the
``count``-th largest value plus the first of those equal to it, the lower index winning a tie: what
the stable sorts of ``encode_chunks_torch`` and ``kvo.largest`` pick.
Supported: power-of-two chunk, group and head_dim, code widths that divide a byte (1, 2, 4, 8 bits),
chunks whose order fills whole bytes; anything else takes the torch path (``supports``).
``rotate`` needs nothing here: K and V arrive rotated. The kernels are in ``kvo_triton_kernels``,
imported on first use only, so CPU-only installs never import Triton.

Traffic per layer (opt-6.7b, 16 x 1920 finalised tokens): K read once in its float32 (0.5 GB) and
V in fp16 (0.25 GB), each anchor row once more (1/8, from cache), about 0.1 GB of codes written,
against the torch path's tens of passes over float32 copies of both.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvpr.compress.packing import packed_len
from kvpr.errors import KvprError

if TYPE_CHECKING:
    from kvpr.compress.kvo_config import KVOConfig

BYTE_WIDTHS = (1, 2, 4, 8)  # code widths whose codes never straddle a byte


@dataclass(frozen=True)
class Tiles:
    """How the encoder's work is cut: a program takes a block of channels of one V group's tokens
    (K: whole channel groups, whose ranges, picks and bytes stay inside; V: any channels, all of
    its work is per channel), with so many warps. Results do not depend on it; speed does
    (benchmarks/bench_kvo_encode.py times the choices: the defaults are the fastest on the H200 at
    opt-6.7b's prefill shape, V 32 channels a warp at 2.88 ms against 3.37 for 16,
    benchmarks/results/kvo-encode-paper-NVIDIA_H200-20261203.json)."""

    k_channels: int = 32  # raised to a channel group (and 8), lowered to head_dim
    k_warps: int = 2
    v_channels: int = 32  # raised to 8 (a byte of keep mask), lowered to head_dim
    v_warps: int = 1

    def __post_init__(self) -> None:
        if not all(_power_of_two(n) for n in dataclasses.astuple(self)):
            raise KvprError(f"{self}: channels and warps must be powers of two")


RECENT_ELEMENTS = 4096  # values per program of the recent-window quantiser


def runs_here(x: torch.Tensor) -> bool:
    """Triton can encode ``x``: a CUDA tensor, or any tensor under Triton's CPU interpreter."""
    return (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    """Looked up once: every decode step asks (``encode_recent``)."""
    return importlib.util.find_spec("triton") is not None


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(cfg: KVOConfig, d: int) -> bool:
    """The kernels' tiles are powers of two, and their packing keeps every code inside one byte."""
    widths = (cfg.k_anchor_bits, cfg.k_diff_bits, cfg.v_bits, cfg.v_anchor_bits)
    return (
        all(_power_of_two(n) for n in (cfg.chunk, cfg.group, d))
        and all(bits in BYTE_WIDTHS for bits in widths)
        and cfg.chunk * cfg.order_bits >= 8
    )


def encodes_by_default(x: torch.Tensor, cfg: KVOConfig) -> bool:
    """``fused=None`` encodes the tokens of ``x`` ([t, b, n_kv, d]: K, or its int8 recent form) here."""
    return x.shape[0] > 0 and runs_here(x) and supports(cfg, x.shape[-1])


def _kernels() -> Any:
    """The kernels' module (it imports Triton, so only here)."""
    from kvpr.compress import kvo_triton_kernels

    return kvo_triton_kernels


def encode_chunks_fused(
    k: torch.Tensor,
    v: torch.Tensor,
    scores: torch.Tensor,
    cfg: KVOConfig,
    tiles: Tiles = Tiles(),
    k_int8: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``kvo.encode_chunks`` in two launches (K, V): the same names, dtypes, shapes and values.

    Args:
        k, v: [t, b, n_kv, d] with ``t % group == 0`` and ``supports(cfg, d)``. scores: [t, b, n_kv].
        tiles: the programs' blocks of channels and warps (not the results).
        k_int8: K's scale and zero fp16 [t, b, n_kv, d / group] when ``k`` holds the recent form's
            uint8 codes (``kvo.encode_recent``): dequantised as read, as ``decode_recent_k`` would.
    """
    t, b, n, d = k.shape
    S, G, P = cfg.chunk, cfg.group, cfg.anchors_per_group
    A, C, nG, groups = S - 1, t // S, t // G, d // G
    if t % G or not supports(cfg, d):
        raise KvprError(f"the fused KVO encoder does not take t={t}, d={d} with {cfg}: use fused=False")
    assert v.shape == k.shape and scores.shape == (t, b, n), (k.shape, v.shape, scores.shape)
    assert k_int8 is None or all(x.shape == (t, b, n, groups) for x in k_int8), "k_int8: [t, b, n_kv, d / group]"
    dev, u8, f16 = k.device, torch.uint8, torch.float16
    kb = packed_len(cfg.k_keep, cfg.k_diff_bits)
    range_shape = (nG, b, n, d) if cfg.per_channel else (C, b, n, A, groups)
    out = {
        "order": torch.empty(C, b, n, packed_len(S, cfg.order_bits), dtype=u8, device=dev),
        "k_anchor_codes": torch.empty(C, b, n, packed_len(d, cfg.k_anchor_bits), dtype=u8, device=dev),
        "k_anchor_scale": torch.empty(C, b, n, groups, dtype=f16, device=dev),
        "k_anchor_zero": torch.empty(C, b, n, groups, dtype=f16, device=dev),
        "k_diff_codes": torch.empty(C, b, n, A, groups * kb, dtype=u8, device=dev),
        "k_diff_scale": torch.empty(range_shape, dtype=f16, device=dev),
        "k_diff_zero": torch.empty(range_shape, dtype=f16, device=dev),
        "k_keep": torch.empty(C, b, n, A, d // 8, dtype=u8, device=dev),
        "v_anchor_codes": torch.empty(nG, b, n, P, packed_len(d, cfg.v_anchor_bits), dtype=u8, device=dev),
        "v_codes": torch.empty(nG, b, n, cfg.v_keep - P, packed_len(d, cfg.v_bits), dtype=u8, device=dev),
        "v_keep": torch.empty(nG, b, n, G - P, d // 8, dtype=u8, device=dev),
        "v_scale": torch.empty(nG, b, n, d, dtype=f16, device=dev),
        "v_zero": torch.empty(nG, b, n, d, dtype=f16, device=dev),
    }
    if nG == 0:
        return out
    kernels = _kernels()
    k, v, scores = k.contiguous(), v.contiguous(), scores.contiguous()
    k_scale, k_zero = (x.contiguous() for x in k_int8) if k_int8 is not None else (k, k)  # any pointer if unused
    # a program per (V group, sequence, head) and block of channels; neighbours share tokens
    k_channels = min(d, max(8, G, tiles.k_channels))  # powers of two: whole groups, whole mask bytes
    kernels.encode_k[(nG * b * n * (d // k_channels),)](
        k, k_scale, k_zero, scores, out["order"], out["k_anchor_codes"], out["k_anchor_scale"], out["k_anchor_zero"],
        out["k_diff_codes"], out["k_diff_scale"], out["k_diff_zero"], out["k_keep"], b * n,
        S=S, P=P, D=d, DK=k_channels, G=G, A_BITS=cfg.k_anchor_bits, D_BITS=cfg.k_diff_bits, K_KEEP=cfg.k_keep,
        KB=kb, ORDER_BITS=cfg.order_bits, PER_CHANNEL=cfg.per_channel, K_INT8=k_int8 is not None,
        num_warps=tiles.k_warps, enable_fp_fusion=False,
    )  # fmt: skip
    v_channels = min(d, max(8, tiles.v_channels))
    kernels.encode_v[(nG * b * n * (d // v_channels),)](
        v, scores, out["v_anchor_codes"], out["v_codes"], out["v_keep"], out["v_scale"], out["v_zero"], b * n,
        S=S, P=P, D=d, DB=v_channels, V_BITS=cfg.v_bits, VA_BITS=cfg.v_anchor_bits, V_KEEP=cfg.v_keep,
        num_warps=tiles.v_warps, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def recent_supports(group: int, d: int) -> bool:
    """The recent form's kernel tiles [rows, d] in groups of ``group`` channels: powers of two."""
    return _power_of_two(group) and _power_of_two(d) and group <= d


def quantize_recent_k(k: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quant.quantize_groups(k.float(), 8, group)`` in one launch (``kvo.encode_recent``'s K),
    bit-identical: codes uint8 [..., d], scale and zero fp16 [..., d / group]."""
    d = k.shape[-1]
    if not recent_supports(group, d):
        raise KvprError(f"the fused recent-window quantiser does not take d={d}, group={group}: use the torch path")
    x = k.contiguous()
    codes = torch.empty(k.shape, dtype=torch.uint8, device=k.device)
    scale = torch.empty(*k.shape[:-1], d // group, dtype=torch.float16, device=k.device)
    zero = torch.empty_like(scale)
    num_rows = x.numel() // d
    if num_rows:
        block_rows = max(1, RECENT_ELEMENTS // d)  # a [rows, d] tile of about RECENT_ELEMENTS values
        _kernels().quantize_rows[(-(-num_rows // block_rows),)](
            x, codes, scale, zero, num_rows, D=d, G=group, BLOCK_ROWS=block_rows, enable_fp_fusion=False
        )
    return codes, scale, zero
