"""KVO (DAC 2025): quantisation-aware pruning of the KV cache, in packed form (real bytes).

Finalised windows are split into chunks whose tokens are reordered by importance, so the first
token of each chunk is its salient anchor. K: 8-bit anchors, the other tokens as 2-bit differences
from the dequantised anchor with only the largest ``k_keep`` of each channel group kept. V: per
channel over token groups, 2-bit with 4-bit anchors on a finer grid of the same range, keeping the
anchors and the largest values. See DESIGN.md section 3; the decode-time cache is kvo_state.py.

Tensor layouts of one encoded block of ``C`` chunks (``A = chunk - 1`` non-anchors,
``P = group / chunk`` anchors per V group, ``nG = C / P`` V groups), all uint8 unless noted:

| name            | shape                                   | content                          |
|-----------------|-----------------------------------------|----------------------------------|
| order           | [C, b, n_kv, chunk*pb/8]                | original in-chunk index per slot |
| k_anchor_codes  | [C, b, n_kv, d*8/8]                     | anchor K, 8-bit                  |
| k_anchor_scale  | [C, b, n_kv, d/G] fp16 (and _zero)      | per token, per 32 channels       |
| k_diff_codes    | [C, b, n_kv, A, d/G * k_keep*2/8]       | kept differences only, 2-bit     |
| k_diff_scale    | [C, b, n_kv, A, d/G] fp16 (and _zero)   | per token, per 32 channels       |
|  (axis channel) | [nG, b, n_kv, d] fp16 (and _zero)       | per channel, per V group         |
| k_keep          | [C, b, n_kv, A, d/8]                    | keep mask, 1 bit per channel     |
| v_anchor_codes  | [nG, b, n_kv, P, d*4/8]                 | anchor V, 4-bit                  |
| v_codes         | [nG, b, n_kv, v_keep-P, d*2/8]          | kept non-anchor V only, 2-bit    |
| v_keep          | [nG, b, n_kv, G-P, d/8]                 | keep mask of the non-anchors     |
| v_scale         | [nG, b, n_kv, d] fp16 (and v_zero)      | per channel, per 32 tokens       |
| rk_codes        | [r, b, n_kv, d]                         | recent form (``r`` tokens): K    |
| rk_scale        | [r, b, n_kv, d/G] fp16 (and rk_zero)    | int8 per token, per 32 channels  |
| rv              | [r, b, n_kv, d] fp16                    | recent form: V as is             |

Two knobs beyond the paper (defaults off, i.e. the paper's codec):

- ``k_diff_axis="channel"``: the 2-bit differences get one scale and zero per channel over the
  ``P * A`` non-anchor tokens of a V group (KIVI's axis, 28 tokens at the paper's sizes) instead of
  one per token per 32 channels. It fits the chunk structure because a selected chunk already
  fetches its V group's row: ``k_diff_scale``/``k_diff_zero`` become [nG, b, n_kv, d] fp16 and
  ride in that row (``group_names``), so a step reads no extra row. Per-chunk scales (over 7
  tokens) would cost ``4 d / 7`` bytes a token, several times the per-token ones; per group they
  cost ``d / 8`` against ``7 d / 64``. Pruning is unchanged (``k_keep`` per token and group).
- ``rotate`` (none, k, v, kv): K and/or V are multiplied by the normalized Hadamard matrix ``H``
  over the head dimension (``kvpr.compress.rotation``) before anything is quantised, recent window
  included; nothing extra is stored. ``H`` is orthogonal and symmetric, so ``q . k = (H q) . (H k)``
  and ``sum p_i v_i = H sum p_i (H v_i)``: the runtime scores anchors and attends with ``H q`` and
  un-rotates only the output (one ``d``-vector per query head a step), instead of un-rotating every
  anchor, selected key and value (``C + m * chunk + r`` vectors per KV head a step).
  :class:`KVOCodec` and the reference ``kvo_state`` un-rotate their decoded K,V (the codec contract).

The codec keeps a trailing partial window (``t % window`` tokens) in the recent form, as the
decode-time cache keeps its recent window. Slot ``j`` of chunk ``c`` holds original token
``c*chunk + order[c, ..., j]``; the codec's decode undoes the order, the decode-time cache does
not need to (RoPE is already applied to K).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvpr.cache.codec import EncodedKV, check_codec, check_kv, owned
from kvpr.compress import kvo_triton
from kvpr.compress.kvo_config import K_DIFF_RANGE, KVOConfig, check_head_dim
from kvpr.compress.packing import (
    pack_bits,
    pack_mask,
    packed_len,
    unpack_bits,
    unpack_mask,
)
from kvpr.compress.quant import dequantize, dequantize_groups, fit_range, quantize, quantize_groups
from kvpr.compress.rotation import hadamard
from kvpr.errors import KvprError

Tensors = dict[str, torch.Tensor]
TensorMap = Mapping[str, torch.Tensor]
RECENT_NAMES: tuple[str, ...] = ("rk_codes", "rk_scale", "rk_zero", "rv")


def rotate_kv(k: torch.Tensor, v: torch.Tensor, cfg: KVOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V in the basis they are stored in: ``x @ H`` (float32) for the parts ``cfg.rotate``
    names, the others as given. ``H`` is its own inverse, so this also un-rotates decoded parts."""
    return (hadamard(k) if cfg.rotates_k else k), (hadamard(v) if cfg.rotates_v else v)


def largest(x: torch.Tensor, count: int, dim: int, by_sort: bool | None = None) -> torch.Tensor:
    """Ascending indices of the ``count`` largest entries of ``x >= 0`` along ``dim``; ties go to the
    lower index, so CPU and GPU keep the same entries (topk alone breaks ties differently on each).

    Two formulations pick the same entries (the tests hold them equal). ``by_sort`` (the default on
    CUDA): one stable descending sort of each row, whose first ``count`` are the picks; CUDA sorts
    rows this short in registers, one warp each, while its topk runs a 64-bit radix select per row.
    Otherwise (the default elsewhere, where topk is the faster): each entry gets a distinct int64
    key, its float32 bits (which order as the values for ``x >= 0``) then the reversed index, so
    one ``topk`` picks exactly the entries a stable descending sort would put first.
    Only the ``count`` picked indices are sorted ascending.
    """
    rows = x.float().movedim(dim, -1)  # ``dim`` last: topk and sort along rows
    if x.is_cuda if by_sort is None else by_sort:
        top = rows.contiguous().sort(dim=-1, descending=True, stable=True).indices[..., :count]
    else:
        n = x.shape[dim]
        rank = torch.arange(n - 1, -1, -1, device=x.device)  # the lower index wins a tie
        key = rows.view(torch.int32).to(torch.int64, memory_format=torch.contiguous_format).mul_(n).add_(rank)
        top = key.topk(count, dim=-1, sorted=False).indices
    return top.sort(dim=-1).values.movedim(-1, dim)


def encode_chunks(
    k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, cfg: KVOConfig, fused: bool | None = None
) -> Tensors:
    """Reorder, quantise and prune ``t`` tokens (``t % group == 0``) into KVO tensors.

    Args:
        k, v: [t, b, n_kv, d]. scores: [t, b, n_kv], higher = more attended (ties keep order; no NaN).
        fused: the Triton encoder (``kvo_triton``, bit-identical); None: where it is chosen by default
            and supports ``cfg`` (``kvo_triton.encodes_by_default``), else :func:`encode_chunks_torch`.
    Returns:
        the named tensors of the module docstring's table.
    """
    if fused is None:
        fused = kvo_triton.encodes_by_default(k, cfg)
    if fused:
        return kvo_triton.encode_chunks_fused(k, v, scores, cfg)
    return encode_chunks_torch(k, v, scores, cfg)


def encode_chunks_from_recent(
    recent: TensorMap, v: torch.Tensor, scores: torch.Tensor, cfg: KVOConfig, fused: bool | None = None
) -> Tensors:
    """:func:`encode_chunks` of K in its recent form (``encode_recent``'s int8 codes, scales, zeros):
    the fused path dequantises as it reads (int8 in, not a float32 copy), bit-identical to
    ``encode_chunks(decode_recent_k(recent, d), v, scores, cfg)``, the torch path."""
    codes = recent["rk_codes"]  # [t, b, n_kv, d]
    d = codes.shape[-1]
    if fused is None:
        fused = kvo_triton.encodes_by_default(codes, cfg)
    if fused:
        k_int8 = (recent["rk_scale"], recent["rk_zero"])
        return kvo_triton.encode_chunks_fused(codes, v, scores, cfg, k_int8=k_int8)
    return encode_chunks_torch(decode_recent_k(recent, d), v, scores, cfg)


def encode_chunks_torch(k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor, cfg: KVOConfig) -> Tensors:
    """:func:`encode_chunks` in torch (the reference, and the path on CPU): every window, chunk,
    sequence and head at once, a handful of whole-tensor passes per part."""
    t, b, n, d = k.shape
    S, G, A, P = cfg.chunk, cfg.group, cfg.chunk - 1, cfg.anchors_per_group
    C, nG, groups = t // S, t // G, d // G
    order = scores.float().reshape(C, S, b, n).permute(0, 2, 3, 1)  # [C, b, n, S]
    order = torch.argsort(order, dim=-1, descending=True, stable=True)
    # gathered in the input dtype (exact), widened once after
    index = order.unsqueeze(-1).expand(C, b, n, S, d)
    kr = k.reshape(C, S, b, n, d).permute(0, 2, 3, 1, 4).gather(3, index).float()  # [C, b, n, S, d]
    # V straight into its token groups: [nG, b, n, P, S, d], the group's P*S tokens adjacent
    v_index = order.reshape(nG, P, b, n, S).permute(0, 2, 3, 1, 4).unsqueeze(-1).expand(nG, b, n, P, S, d)
    vg = v.reshape(nG, P, S, b, n, d).permute(0, 3, 4, 1, 2, 5).gather(4, v_index).float()

    ka_codes, ka_scale, ka_zero = quantize_groups(kr[..., 0, :], cfg.k_anchor_bits, G)
    ka_hat = dequantize_groups(ka_codes, ka_scale, ka_zero, cfg.k_anchor_bits, d)  # [C, b, n, d]
    diff = (kr[..., 1:, :] - ka_hat.unsqueeze(-2)).reshape(C, b, n, A, groups, G)
    levels = (1 << cfg.k_diff_bits) - 1
    kept = largest(diff.abs(), cfg.k_keep, dim=-1)  # [C, b, n, A, d/G, k_keep]
    if cfg.per_channel:  # one range per channel over the group's P*A differences
        by_group = diff.reshape(nG, P, b, n, A, d).permute(0, 2, 3, 1, 4, 5).reshape(nG, b, n, P * A, d)
        kd_scale, kd_zero = fit_range(by_group, 3, levels)  # [nG, b, n, 1, d]
        # each chunk's channels, at its kept places: [C, b, n, A, d/G, k_keep]
        at_kept = [
            x.repeat_interleave(P, dim=0).reshape(C, b, n, 1, groups, G).expand_as(diff).gather(-1, kept)
            for x in (kd_scale, kd_zero)
        ]
        kd_codes = quantize(diff.gather(-1, kept), *at_kept, levels)
        kd_scale, kd_zero = kd_scale.squeeze(3), kd_zero.squeeze(3)  # [nG, b, n, d]
    else:
        kd_scale, kd_zero = fit_range(diff, -1, levels)  # [C, b, n, A, d/G, 1]
        kd_codes = quantize(diff.gather(-1, kept), kd_scale, kd_zero, levels)  # the kept ones only
        kd_scale, kd_zero = kd_scale.squeeze(-1), kd_zero.squeeze(-1)  # [C, b, n, A, d/G]
    k_keep = torch.zeros_like(diff, dtype=torch.bool).scatter_(-1, kept, True)

    levels, a_levels = (1 << cfg.v_bits) - 1, (1 << cfg.v_anchor_bits) - 1
    v_scale, v_zero = fit_range(vg.view(nG, b, n, P * S, d), 3, levels)  # [nG, b, n, 1, d]: one pass
    va_codes = quantize(vg[..., 0, :], v_scale.float() * (levels / a_levels), v_zero, a_levels)
    others = vg[..., 1:, :].reshape(nG, b, n, P * A, d)  # [nG, b, n, G-P, d]
    v_kept = largest(others.abs(), cfg.v_keep - P, dim=3)  # [nG, b, n, v_keep-P, d]
    vo_codes = quantize(others.gather(3, v_kept), v_scale, v_zero, levels)  # the kept ones only
    v_keep = torch.zeros_like(others, dtype=torch.bool).scatter_(3, v_kept, True)
    return {
        "order": pack_bits(order, cfg.order_bits),
        "k_anchor_codes": ka_codes,
        "k_anchor_scale": ka_scale,
        "k_anchor_zero": ka_zero,
        "k_diff_codes": pack_bits(kd_codes, cfg.k_diff_bits).flatten(-2),
        "k_diff_scale": kd_scale,
        "k_diff_zero": kd_zero,
        "k_keep": pack_mask(k_keep.flatten(-2)),
        "v_anchor_codes": pack_bits(va_codes, cfg.v_anchor_bits),
        "v_codes": pack_bits(vo_codes, cfg.v_bits),
        "v_keep": pack_mask(v_keep),
        "v_scale": v_scale.squeeze(-2),
        "v_zero": v_zero.squeeze(-2),
    }


def decode_anchor_keys(ts: TensorMap, cfg: KVOConfig, d: int) -> torch.Tensor:
    """Dequantised anchor keys, float32 [..., d] (``...`` = the leading dims of the tensors)."""
    codes, scale, zero = ts["k_anchor_codes"], ts["k_anchor_scale"], ts["k_anchor_zero"]
    return dequantize_groups(codes, scale, zero, cfg.k_anchor_bits, d)


def decode_k_chunks(ts: TensorMap, cfg: KVOConfig, d: int) -> torch.Tensor:
    """K of whole chunks in stored order, float32 [..., chunk, d], from chunk-indexed tensors (with
    ``k_diff_axis="channel"`` the chunk's group's ``k_diff_scale``/``k_diff_zero``, [..., d]), in
    the stored basis (rotated if ``cfg.rotate`` rotates K)."""
    groups, A, G = d // cfg.group, cfg.chunk - 1, cfg.group
    anchor = decode_anchor_keys(ts, cfg, d)  # [..., d]
    lead = anchor.shape[:-1]
    keep = unpack_bits(ts["k_keep"], 1, d).reshape(*lead, A, groups, G)  # uint8 0/1
    compact = ts["k_diff_codes"].reshape(*lead, A, groups, packed_len(cfg.k_keep, cfg.k_diff_bits))
    compact = unpack_bits(compact, cfg.k_diff_bits, cfg.k_keep)  # [..., A, d/G, k_keep]
    # kept channel -> its place in ``compact``; counts <= k_keep fit uint8 (group <= 255)
    slot = keep.cumsum(-1, dtype=torch.uint8).long().sub_(1).clamp_(min=0)
    codes = compact.gather(-1, slot)  # [..., A, d/G, G]
    if cfg.per_channel:
        scale, zero = (ts[name].reshape(*lead, 1, groups, G) for name in K_DIFF_RANGE)  # [..., 1, d/G, G]
    else:
        scale, zero = (ts[name].unsqueeze(-1) for name in K_DIFF_RANGE)  # [..., A, d/G, 1]
    diff = dequantize(codes, scale, zero)
    diff = torch.where(keep.bool(), diff, torch.zeros_like(diff)).reshape(*lead, A, d)
    return torch.cat([anchor.unsqueeze(-2), anchor.unsqueeze(-2) + diff], dim=-2)


def decode_v_groups(ts: TensorMap, cfg: KVOConfig, d: int) -> torch.Tensor:
    """V of whole token groups in stored order, float32 [..., P, chunk, d] (P chunks a group)."""
    P, A = cfg.anchors_per_group, cfg.chunk - 1
    levels, a_levels = (1 << cfg.v_bits) - 1, (1 << cfg.v_anchor_bits) - 1
    scale, zero = ts["v_scale"].float().unsqueeze(-2), ts["v_zero"].float().unsqueeze(-2)
    lead = scale.shape[:-2]
    anchors = dequantize(
        unpack_bits(ts["v_anchor_codes"], cfg.v_anchor_bits, d), scale * (levels / a_levels), zero
    )  # [..., P, d]
    keep = unpack_mask(ts["v_keep"], d)  # [..., G-P, d]
    compact = unpack_bits(ts["v_codes"], cfg.v_bits, d)  # [..., v_keep-P, d]
    slot = (keep.cumsum(-2) - 1).clamp_(min=0)
    others = dequantize(compact.gather(-2, slot), scale, zero)  # [..., G-P, d]
    others = torch.where(keep, others, torch.zeros_like(others)).reshape(*lead, P, A, d)
    return torch.cat([anchors.unsqueeze(-2), others], dim=-2)


def decode_v_chunks(ts: TensorMap, position: torch.Tensor, cfg: KVOConfig, d: int) -> torch.Tensor:
    """V of one chunk of each group, float32 [..., chunk, d], without decoding the whole group.

    Args:
        ts: group-indexed tensors with leading dims ``...``; position: int64 [...], the chunk's
            place in its group (``chunk_index % P``).
    """
    A, lead = cfg.chunk - 1, position.shape
    levels, a_levels = (1 << cfg.v_bits) - 1, (1 << cfg.v_anchor_bits) - 1
    scale, zero = ts["v_scale"].float().unsqueeze(-2), ts["v_zero"].float().unsqueeze(-2)
    row = position[..., None, None]  # [..., 1, 1]
    anchor = ts["v_anchor_codes"].gather(-2, row.expand(*lead, 1, ts["v_anchor_codes"].shape[-1]))
    anchor = dequantize(unpack_bits(anchor, cfg.v_anchor_bits, d), scale * (levels / a_levels), zero)
    keep = unpack_bits(ts["v_keep"], 1, d)  # uint8 0/1 [..., G-P, d]: the group's mask
    rows = torch.arange(keep.shape[-2], device=keep.device)[:, None]  # [G-P, 1]
    first = row * A  # [..., 1, 1]: the chunk's first non-anchor row
    # Kept values of earlier chunks come first in ``v_codes``; counts fit uint8 (< group).
    before = (keep * (rows < first)).sum(dim=-2, keepdim=True, dtype=torch.uint8)  # [..., 1, d]
    keep = keep.gather(-2, (first + torch.arange(A, device=keep.device)[:, None]).expand(*lead, A, d))
    slot = (before + keep.cumsum(-2, dtype=torch.uint8)).long().sub_(1).clamp_(min=0)  # [..., A, d]
    others = dequantize(unpack_bits(ts["v_codes"], cfg.v_bits, d).gather(-2, slot), scale, zero)
    others = torch.where(keep.bool(), others, torch.zeros_like(others))
    return torch.cat([anchor, others], dim=-2)


def encode_recent(k: torch.Tensor, v: torch.Tensor, cfg: KVOConfig, fused: bool | None = None) -> Tensors:
    """Recent-window form of [t, b, n_kv, d] tokens: K int8 per token in channel groups, V fp16.
    K in one Triton launch (bit-identical) with ``fused``; None: where it runs and tiles ``d``."""
    if fused is None:
        fused = k.numel() > 0 and kvo_triton.runs_here(k) and kvo_triton.recent_supports(cfg.group, k.shape[-1])
    if fused:
        codes, scale, zero = kvo_triton.quantize_recent_k(k, cfg.group)
    else:
        codes, scale, zero = quantize_groups(k.float(), 8, cfg.group)  # widened once, not by each pass inside
    return {"rk_codes": codes, "rk_scale": scale, "rk_zero": zero, "rv": owned(v, torch.float16)}


def decode_recent_k(ts: TensorMap, d: int) -> torch.Tensor:
    """Float32 [t, b, n_kv, d] keys of the recent-window form."""
    return dequantize_groups(ts["rk_codes"], ts["rk_scale"], ts["rk_zero"], 8, d)


class KVOCodec:
    """KVO as a block codec: whole windows compressed, a trailing partial window in recent form.

    ``decode`` returns tokens in their original order (the stored ``order`` is applied back), in
    the model's basis (un-rotated).
    """

    tokenwise = False  # token groups / windows: not sliceable per token

    name = "kvo"

    def __init__(self, config: KVOConfig | None = None) -> None:
        self.config = config or KVOConfig()

    def encode(self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None) -> EncodedKV:
        """Encode [t, b, n_kv, d]; ``scores`` [t, b, n_kv] is each token's accumulated attention
        (None: no reordering, the first token of each chunk is its anchor)."""
        t, b, n, d = check_kv(k, v)
        cfg = self.config
        check_head_dim(d, cfg)
        if scores is None:
            scores = torch.zeros(t, b, n, device=k.device)
        if scores.shape != (t, b, n):
            raise KvprError(f"KVO scores {tuple(scores.shape)} must be [t, b, n_kv] = {(t, b, n)}")
        full = t - t % cfg.window
        k, v = rotate_kv(k, v, cfg)
        tensors = encode_chunks(k[:full], v[:full], scores[:full], cfg)
        tensors |= encode_recent(k[full:], v[full:], cfg)
        return EncodedKV(self.name, (t, b, n, d), tensors)

    def decode(self, enc: EncodedKV, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        check_codec(enc, self.name)
        cfg, ts = self.config, enc.tensors
        t, b, n, d = enc.shape
        S = cfg.chunk
        C = ts["order"].shape[0]
        if cfg.per_channel:  # each chunk its group's range
            ts = dict(ts) | {name: ts[name].repeat_interleave(cfg.anchors_per_group, dim=0) for name in K_DIFF_RANGE}
        kr = decode_k_chunks(ts, cfg, d)  # [C, b, n, S, d]
        vr = decode_v_groups(ts, cfg, d)  # [nG, b, n, P, S, d]
        vr = vr.permute(0, 3, 1, 2, 4, 5).reshape(C, b, n, S, d)
        order = unpack_bits(ts["order"], cfg.order_bits, S).long()  # [C, b, n, S]
        index = order.unsqueeze(-1).expand(C, b, n, S, d)
        k = torch.empty_like(kr).scatter_(3, index, kr)  # slot j -> original position order[j]
        v = torch.empty_like(vr).scatter_(3, index, vr)
        k = k.permute(0, 3, 1, 2, 4).reshape(C * S, b, n, d)
        v = v.permute(0, 3, 1, 2, 4).reshape(C * S, b, n, d)
        k, v = rotate_kv(torch.cat([k, decode_recent_k(ts, d)]), torch.cat([v, ts["rv"].float()]), cfg)
        return k.to(dtype), v.to(dtype)  # [t, b, n_kv, d]

    def nbytes(self, enc: EncodedKV) -> int:
        return enc.nbytes

    def bytes_per_token(self, b: int, n_kv: int, d: int) -> float:
        """Steady state: one encoded window per ``window`` tokens (the recent window excluded)."""
        return self.config.window_nbytes(b, n_kv, d) / self.config.window
