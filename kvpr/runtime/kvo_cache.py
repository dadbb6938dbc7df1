"""KVO's decode-time cache of one layer, on the device or with its packed chunks in host memory.

The same bookkeeping as :class:`kvpr.compress.kvo_state.KVOLayerState` (the tested reference), laid
out for the runtime: preallocated, and split by what a decode step needs::

    where                  what                                        read per step
    compute device         anchor keys (8-bit codes, scale, zero)      all: q . K_anchor scores every chunk
                           chunk validity, recent window (K int8, V
                           fp16, accumulated scores)                   all
    device or host (tier)  K rows: one per (chunk, seq, head): 2-bit   the selected chunks only
                           differences, scales, keep masks
                           V rows: one per (32-token group, seq, head) the groups of the selected chunks
                           order rows (the in-chunk permutation)       never (attention is order-free)

With ``config.rotate`` every token is stored rotated (``kvo.rotate_kv``, once, when appended) and
the step works in that basis: the chunks are scored and attended with the rotated query ``H q``
(``q . k = Hq . Hk``) and, where V is rotated, only the output is un-rotated. That is one transform
per query head a step, against un-rotating every anchor and gathered key and value (what the
reference ``KVOLayerState`` does, and what the tests compare against). With
``k_diff_axis="channel"`` the K differences' scales are per V group and ride in the V rows.

With the tier in pinned host memory on a CUDA device a kernel reads only the selected rows, in
place over PCIe, with no host wait in the step; elsewhere the step moves the selection's indices
to the host, gathers the selected rows into staging and copies only those bytes (``kvpr.cache.rows``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.profiler import record_function

from kvpr.cache.rows import GatherStaging, RowLayout, RowTier
from kvpr.cache.storage import CacheShape
from kvpr.compress.kvo import (
    RECENT_NAMES,
    Tensors,
    decode_anchor_keys,
    decode_k_chunks,
    decode_recent_k,
    decode_v_chunks,
    encode_chunks,
    encode_chunks_from_recent,
    encode_recent,
    rotate_kv,
)
from kvpr.compress.kvo_config import K_DIFF_RANGE, KVOConfig, check_head_dim
from kvpr.compress.rotation import hadamard
from kvpr.runtime.layer_caches import decode_attention

ANCHOR_NAMES = ("k_anchor_codes", "k_anchor_scale", "k_anchor_zero")
K_ROW_NAMES = ("k_diff_codes", "k_diff_scale", "k_diff_zero", "k_keep")
V_ROW_NAMES = ("v_anchor_codes", "v_codes", "v_keep", "v_scale", "v_zero")


def row_names(config: KVOConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The parts of a K row (one per chunk) and of a V row (one per V group): per-channel K
    difference ranges belong to the group, so they join its V row."""
    if config.per_channel:
        return tuple(n for n in K_ROW_NAMES if n not in K_DIFF_RANGE), V_ROW_NAMES + K_DIFF_RANGE
    return K_ROW_NAMES, V_ROW_NAMES


def kvo_layouts(config: KVOConfig, d: int) -> tuple[Tensors, RowLayout, RowLayout]:
    """Per-head parts of one V group of chunks (a probe encoding), and the K and V row layouts."""
    probe = torch.zeros(config.group, 1, 1, d)
    parts = encode_chunks(probe, probe, probe[..., 0], config)
    k_names, v_names = row_names(config)
    return parts, RowLayout.of(parts, k_names, lead=3), RowLayout.of(parts, v_names, lead=3)


def kvo_split(config: KVOConfig, context_len: int) -> tuple[int, int]:
    """(finalised chunks, recent tokens) after ``context_len`` slots were appended."""
    w = config.window
    finalised = max(0, (context_len - w) // w * w)
    return finalised // config.chunk, context_len - finalised


def decode_selected(
    k_parts: Tensors,
    v_parts: Tensors,
    position: torch.Tensor,
    count: torch.Tensor,
    cfg: KVOConfig,
    d: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The selected chunks' K and V from their packed parts: [b, n_kv, m*chunk, d] in ``dtype``, and
    the mask [b, n_kv, m*chunk] of their real tokens.

    Args:
        k_parts: each selected chunk's anchor and K row parts [b, n_kv, m, *]; v_parts: the V row
            parts of its group [b, n_kv, m, *]; position: its place in the group, count: its real
            tokens, both [b, n_kv, m].
    Every input is [b, n_kv, m, *], so the shapes stay fixed from the step that first has
    ``top_chunks`` chunks, and ``torch.compile`` fuses the dozens of element-wise passes into a few kernels.
    """
    b, n, m = position.shape
    S = cfg.chunk
    k_sel = decode_k_chunks(k_parts, cfg, d)  # [b, n_kv, m, S, d]
    v_sel = decode_v_chunks(v_parts, position, cfg, d)  # [b, n_kv, m, S, d]
    mask = (torch.arange(S, device=position.device) < count.unsqueeze(-1)).reshape(b, n, m * S)
    return k_sel.reshape(b, n, m * S, d).to(dtype), v_sel.reshape(b, n, m * S, d).to(dtype), mask


@functools.cache
def compiled_decode_selected() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`decode_selected` compiled once per process (``--compile``): every layer and step of
    the same shapes reuses the kernels (shapes are static: a new ``m`` compiles anew)."""
    return torch.compile(decode_selected, dynamic=False)


class KVOCache:
    """One layer's KVO cache for ``b`` sequences (see the module docstring for the layout).

    Args:
        config: KVO knobs. shape: batch, slots, heads and dtype. device: the compute device.
        on_host: keep the K/V rows (and orders) in host memory; pin: page-locked (CUDA present).
        staging: pinned buffers shared by all layers for the host gathers.
        compile: decode the selected chunks with ``torch.compile``'s fused kernels.
    """

    def __init__(
        self,
        config: KVOConfig,
        shape: CacheShape,
        device: torch.device,
        on_host: bool = False,
        pin: bool = False,
        staging: GatherStaging | None = None,
        compile: bool = False,
    ) -> None:
        d = shape.head_dim
        check_head_dim(d, config)
        self.config, self.device, self.dtype = config, device, shape.dtype
        b, n = shape.batch_size, shape.num_kv_heads
        self.b, self.n, self.d = b, n, d
        self.prefill_queries: int | None = config.prefill_queries
        self._decode_selected = compiled_decode_selected() if compile else decode_selected
        parts, self.k_layout, self.v_layout = kvo_layouts(config, d)
        chunks_per_window = config.window // config.chunk
        max_chunks = -(-shape.max_len // config.window) * chunks_per_window
        self.anchors = {
            name: torch.zeros((max_chunks, b, n, *parts[name].shape[3:]), dtype=parts[name].dtype, device=device)
            for name in ANCHOR_NAMES
        }  # [C_max, b, n_kv, *]
        self.chunk_valid = torch.zeros(max_chunks, b, dtype=torch.uint8, device=device)  # [C_max, b]
        lead = (b, n)
        groups = max_chunks // config.anchors_per_group
        self.k_rows = RowTier(max_chunks, lead, self.k_layout.row_bytes, device, on_host, pin, staging, "kvo_k")
        self.v_rows = RowTier(groups, lead, self.v_layout.row_bytes, device, on_host, pin, staging, "kvo_v")
        self.orders = RowTier(max_chunks, lead, parts["order"].shape[-1], device, on_host, pin, None, "kvo_order")
        window = torch.zeros(2 * config.window, b, n, d, device=device)
        self.recent = encode_recent(window, window, config)  # [2w, b, n_kv, *]: K int8, V fp16
        self.recent_scores = torch.zeros(2 * config.window, b, n, device=device)  # [2w, b, n_kv]
        self.recent_valid = torch.zeros(2 * config.window, b, dtype=torch.bool, device=device)  # [2w, b]
        self.recent_len = 0
        self.num_chunks = 0
        self.link_bytes = 0
        self._read_fixed = 0  # the last step's anchors, recent window and K rows (bytes)
        self._read_v_rows: torch.Tensor | None = None  # and the flat indices of the V rows it used

    @property
    def read_bytes(self) -> int:
        """Bytes the last decode step read: every anchor, the recent window, the selected chunks' K
        rows and each V group row they share once (counted when asked: no device sync per step)."""
        if self._read_v_rows is None:
            return self._read_fixed
        return self._read_fixed + int(torch.unique(self._read_v_rows).numel()) * self.v_layout.row_bytes

    # -- writing -----------------------------------------------------------------------------

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None:
        self.append(k, v, scores, valid)

    def append(
        self, k: torch.Tensor, v: torch.Tensor, scores: torch.Tensor | None = None, valid: torch.Tensor | None = None
    ) -> None:
        """Add [t, b, n_kv, d] tokens (scores [t, b, n_kv], valid [t, b]); once ``2 * window`` are
        recent, finalise the oldest whole windows (as ``KVOLayerState.append``)."""
        t, w = k.shape[0], self.config.window
        if scores is None:
            scores = torch.zeros(k.shape[:3], device=self.device)
        if valid is None:
            valid = torch.ones(k.shape[:2], dtype=torch.bool, device=self.device)
        v = v.masked_fill(~valid[:, :, None, None], 0.0)  # padding V never widens a range
        new = encode_recent(*rotate_kv(k, v, self.config), self.config)  # stored rotated, if at all
        r, total = self.recent_len, self.recent_len + t
        if total < 2 * w:
            for name in RECENT_NAMES:
                self.recent[name][r:total] = new[name]
            self.recent_scores[r:total], self.recent_valid[r:total] = scores.float(), valid
            self.recent_len = total
            return
        if r == 0:  # a prompt into an empty cache: nothing to join
            joined, all_scores, all_valid = new, scores.float(), valid  # [total, b, n_kv, *], ..., [total, b]
        else:
            joined = {name: torch.cat([self.recent[name][:r], new[name]]) for name in RECENT_NAMES}
            all_scores = torch.cat([self.recent_scores[:r], scores.float()])  # [total, b, n_kv]
            all_valid = torch.cat([self.recent_valid[:r], valid])  # [total, b]
        count = (total - w) // w * w  # leaves window..2*window-1 recent
        self._finalise({name: x[:count] for name, x in joined.items()}, all_scores[:count], all_valid[:count])
        rest = total - count
        for name in RECENT_NAMES:
            self.recent[name][:rest] = joined[name][count:]
        self.recent_scores[:rest], self.recent_valid[:rest] = all_scores[count:], all_valid[count:]
        self.recent_len = rest

    def _finalise(self, old: Tensors, scores: torch.Tensor, valid: torch.Tensor) -> None:
        """Encode ``count`` recent tokens (whole windows) into chunks: anchors here, rows to the tier."""
        cfg, count = self.config, valid.shape[0]
        scores = scores.masked_fill(~valid[:, :, None], float("-inf"))  # padding is never an anchor
        # K comes from its int8 recent form: the original is no longer held.
        enc = encode_chunks_from_recent(old, old["rv"], scores, cfg)
        first, last = self.num_chunks, self.num_chunks + count // cfg.chunk
        for name in ANCHOR_NAMES:
            self.anchors[name][first:last] = enc[name]
        self.chunk_valid[first:last] = valid.reshape(-1, cfg.chunk, self.b).sum(dim=1).to(torch.uint8)
        self.k_rows.write(self.k_layout.pack(enc, lead=3))  # [C_new, b, n_kv, Rk]
        self.v_rows.write(self.v_layout.pack(enc, lead=3))  # [C_new / P, b, n_kv, Rv]
        self.orders.write(enc["order"])
        self.num_chunks = last

    # -- reading -----------------------------------------------------------------------------

    def stored_query(self, q: torch.Tensor) -> torch.Tensor:
        """``q`` [b, n_q, d] in the basis K is stored in: ``H q`` where K is rotated (q . k kept)."""
        return hadamard(q).to(q.dtype) if self.config.rotates_k else q

    def select(self, q: torch.Tensor) -> torch.Tensor | None:
        """Chunks to attend, int64 [b, n_kv, m] (best first), scored by ``q . K_anchor`` with the
        query heads of each KV head combined by ``gqa_reduce``; all of them (in order, unscored)
        when ``top_chunks`` covers every chunk; None when nothing is finalised yet."""
        return self._select(self.stored_query(q))

    def _select(self, q: torch.Tensor) -> torch.Tensor | None:
        """:meth:`select` for a query already in the stored basis (:meth:`stored_query`)."""
        C, cfg = self.num_chunks, self.config
        if C == 0:
            return None
        if cfg.top_chunks >= C:
            return torch.arange(C, device=self.device).expand(self.b, self.n, C)
        anchors = decode_anchor_keys({n: x[:C] for n, x in self.anchors.items()}, cfg, self.d)  # [C, b, n_kv, d]
        qg = q.float().reshape(self.b, self.n, -1, self.d)  # [b, n_kv, g, d]
        scores = torch.einsum("bngd,cbnd->bngc", qg, anchors)  # [b, n_kv, g, C]
        scores = scores.amax(dim=2) if cfg.gqa_reduce == "max" else scores.sum(dim=2)
        empty = (self.chunk_valid[:C] == 0).T  # [b, C]: chunks of padding only score last
        scores = scores.masked_fill(empty[:, None, :], float("-inf"))
        return scores.topk(cfg.top_chunks, dim=-1).indices

    def gather(self, selected: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The selected chunks and the recent window, decoded: k, v [b, n_kv, m*chunk + r, d] in the
        model dtype and the stored basis (rotated where ``config.rotate`` says) and a bool mask
        [b, n_kv, m*chunk + r] (False: padding)."""
        b, n, d, cfg = self.b, self.n, self.d, self.config
        r = self.recent_len
        self.link_bytes = 0
        self._read_fixed = r * b * n * (self.recent["rk_codes"][0, 0, 0].numel() + 4 * d // cfg.group + 2 * d)
        self._read_v_rows = None
        with record_function("kvo.decode"):
            k_recent = decode_recent_k({name: x[:r] for name, x in self.recent.items()}, d)  # [r, b, n_kv, d]
            keys = [k_recent.permute(1, 2, 0, 3).to(self.dtype)]
            values = [self.recent["rv"][:r].permute(1, 2, 0, 3).to(self.dtype)]
            masks = [self.recent_valid[:r].T[:, None, :].expand(b, n, r)]
        if selected is None:
            return keys[0], values[0], masks[0]
        bi = torch.arange(b, device=self.device)[:, None, None]  # [b, 1, 1]
        hi = torch.arange(n, device=self.device)[None, :, None]  # [1, n_kv, 1]
        with record_function("kvo.fetch"):
            k_rows, v_rows = self._fetch(selected, bi, hi)  # [b, n_kv, m, Rk or Rv]
        with record_function("kvo.decode"):
            k_parts = {name: self.anchors[name][selected, bi, hi] for name in ANCHOR_NAMES}  # [b, n_kv, m, *]
            k_parts |= self.k_layout.unpack(k_rows)
            v_parts = self.v_layout.unpack(v_rows)
            if cfg.per_channel:  # the K differences' ranges come with the group's V row
                k_parts |= {name: v_parts[name] for name in K_DIFF_RANGE}
            position, count = selected % cfg.anchors_per_group, self.chunk_valid[selected, bi]  # [b, n_kv, m]
            k_sel, v_sel, mask = self._decode_selected(
                k_parts, v_parts, position, count, cfg, d, self.dtype
            )  # [b, n_kv, m*chunk, d] twice, [b, n_kv, m*chunk]
        anchor_bytes = sum(x[: self.num_chunks].numel() * x.element_size() for x in self.anchors.values())
        self._read_fixed += k_rows.numel() + anchor_bytes
        return torch.cat([k_sel, *keys], dim=2), torch.cat([v_sel, *values], dim=2), torch.cat([mask, *masks], dim=2)

    def _fetch(self, selected: torch.Tensor, bi: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed K rows of the selected chunks and the V rows of their groups, on the device
        (``bi``, ``hi``: the batch and head index grids)."""
        b, n, m = selected.shape
        flat_k = ((selected * b + bi) * n + hi).reshape(-1)  # [b * n_kv * m]: row of (chunk, seq, head)
        group = torch.div(selected, self.config.anchors_per_group, rounding_mode="floor")
        flat_v = ((group * b + bi) * n + hi).reshape(-1)  # [b * n_kv * m]: row of (group, seq, head)
        self._read_v_rows = flat_v
        if not self.k_rows.on_host or (self.k_rows.zero_copy and self.v_rows.zero_copy):
            # on the device, or read from host memory in place by a kernel: no host wait in the step
            # (V rows shared by chunks of one group are read once per chunk: finding the distinct
            # ones would need their count on the host)
            k_rows, k_link = self.k_rows.gather(flat_k)
            v_rows, v_link = self.v_rows.gather(flat_v)
            self.link_bytes = k_link + v_link
            return k_rows.view(b, n, m, -1), v_rows.view(b, n, m, -1)
        with record_function("kvo_index.to_host"):
            # Chunks of one group share its V row: copy each distinct row once. On the device, since
            # the host then waits anyway: the one host wait of the step, as the gather needs the selection.
            groups, repeat = torch.unique(flat_v, return_inverse=True)
            index = torch.cat([flat_k, groups]).cpu()
        k_rows, k_link = self.k_rows.gather(index[: flat_k.numel()])
        v_rows, v_link = self.v_rows.gather(index[flat_k.numel() :], repeat=repeat)
        self.link_bytes = k_link + v_link
        return k_rows.view(b, n, m, -1), v_rows.view(b, n, m, -1)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append the token, select, gather, attend, and feed the recent tokens' attention back
        (all in the stored basis: the query rotated in, the output rotated back, where configured)."""
        self.append(k[None], v[None])
        q = self.stored_query(q)  # [b, n_q, d]
        with record_function("kvo.select"):
            selected = self._select(q)
        keys, values, mask = self.gather(selected)
        with record_function("kvo.attend"):
            out, probs = decode_attention(q, keys, values, mask, need_probs=True)  # out [b, n_q * d]
            if self.config.rotates_v:  # sum p_i (H v_i) = H (sum p_i v_i): un-rotate the output only
                out = hadamard(out.view(*q.shape)).to(out.dtype).view(out.shape)
            assert probs is not None
            r = self.recent_len
            received = probs[..., probs.shape[-1] - r :].sum(dim=2)  # [b, n_kv, r]: GQA heads summed
            self.recent_scores[:r] += received.permute(2, 0, 1)
        return out

    # -- sizes -------------------------------------------------------------------------------

    def packed_nbytes(self) -> int:
        """Bytes of the finalised windows: anchors, K/V rows (codes, scales, zeros, keep masks) and orders."""
        anchors = sum(x[: self.num_chunks].numel() * x.element_size() for x in self.anchors.values())
        return anchors + self.k_rows.nbytes() + self.v_rows.nbytes() + self.orders.nbytes()

    def host_nbytes(self) -> int:
        """Host memory of the row tiers (allocated for every slot); 0 when they are on the device."""
        return self.k_rows.host_nbytes() + self.v_rows.host_nbytes() + self.orders.host_nbytes()

    def nbytes(self) -> int:
        """Everything held: the packed windows, chunk validity and the recent window with its scores."""
        r = self.recent_len
        recent = sum(x[:r].numel() * x.element_size() for x in self.recent.values())
        bookkeeping = self.num_chunks * self.b + r * (self.b * self.n * 4 + self.b)
        return self.packed_nbytes() + recent + bookkeeping
