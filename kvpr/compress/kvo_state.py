"""Decode-time KVO cache of one layer: a recent window plus finalised, packed chunks.

Each decode step the runtime appends the new token, scores every chunk by ``q . K_anchor``
(:meth:`KVOLayerState.select_chunks`), decodes only the selected chunks and the recent window
(:meth:`KVOLayerState.gather`) and feeds the attention back (:meth:`accumulate_scores`) so the
recent tokens are reordered by the attention they received when their window is finalised.
Nothing is evicted: unselected chunks are simply not read.

With ``config.rotate`` the tokens are stored rotated (``kvo.rotate_kv``) and this reference
un-rotates what it decodes (anchors for the scores, the gathered K,V), the plain formulation the
runtime's rotated-query one (``runtime/kvo_cache.py``) is tested against.
"""

from __future__ import annotations

import torch

from kvpr.compress.kvo import (
    RECENT_NAMES,
    Tensors,
    decode_anchor_keys,
    decode_k_chunks,
    decode_recent_k,
    decode_v_chunks,
    encode_chunks,
    encode_recent,
    rotate_kv,
)
from kvpr.compress.kvo_config import K_DIFF_RANGE, KVOConfig, check_head_dim
from kvpr.compress.rotation import hadamard
from kvpr.errors import KvprError

_K_NAMES = (
    "k_anchor_codes",
    "k_anchor_scale",
    "k_anchor_zero",
    "k_diff_codes",
    "k_diff_scale",
    "k_diff_zero",
    "k_keep",
)


class KVOLayerState:
    """KVO cache of one layer for a batch of ``b`` sequences with ``n_kv`` KV heads.

    Storage (``C`` finalised chunks, ``r`` recent tokens, ``window <= r < 2 * window`` once
    ``2 * window`` tokens have been appended):
        windows: the tensors of kvo.py's table, leading dim ``C`` (or ``C / P`` for V groups);
        chunk_valid: uint8 [C, b], valid tokens per chunk; they are the chunk's first slots, as
            padding is ordered last;
        recent: K int8 per token in channel groups, V fp16, each [r, b, n_kv, *];
        recent_scores: float32 [r, b, n_kv], accumulated attention; recent_valid: bool [r, b].
    Padding: a token appended with ``valid=False`` is never attended (the masks of ``gather``),
    never an anchor of a chunk with valid tokens, and its V is zeroed so it does not widen ranges.
    """

    def __init__(
        self,
        config: KVOConfig,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> None:
        check_head_dim(head_dim, config)
        self.config = config
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        empty = torch.zeros(0, batch_size, num_kv_heads, head_dim, device=self.device)
        self.windows: Tensors = encode_chunks(empty, empty, empty[..., 0], config)
        self.chunk_valid = torch.zeros(0, batch_size, dtype=torch.uint8, device=self.device)
        self.recent: Tensors = encode_recent(empty, empty, config)
        self.recent_scores = empty[..., 0]  # [r, b, n_kv]
        self.recent_valid = torch.zeros(0, batch_size, dtype=torch.bool, device=self.device)

    @property
    def num_chunks(self) -> int:
        return self.chunk_valid.shape[0]

    @property
    def recent_len(self) -> int:
        return self.recent_valid.shape[0]

    @property
    def num_tokens(self) -> int:
        """Token slots held (padding included): finalised chunks plus the recent window."""
        return self.num_chunks * self.config.chunk + self.recent_len

    def append(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        scores: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """Add ``t`` new tokens and finalise the oldest whole windows once ``2 * window`` are recent.

        Args:
            k, v: [t, b, n_kv, d] (RoPE applied to k). scores: [t, b, n_kv] attention the tokens
                already received (prefill: from the following queries), default 0.
            valid: bool [t, b], False for padding, default all True.
        """
        t = k.shape[0]
        shape = (t, self.batch_size, self.num_kv_heads, self.head_dim)
        if k.shape != shape or v.shape != shape:
            raise KvprError(f"append got k {tuple(k.shape)}, v {tuple(v.shape)}; expected {shape}")
        k, v = k.to(self.device), v.to(self.device)
        if scores is None:
            scores = torch.zeros(shape[:3], device=self.device)
        if valid is None:
            valid = torch.ones(shape[:2], dtype=torch.bool, device=self.device)
        if scores.shape != shape[:3] or valid.shape != shape[:2]:
            raise KvprError(f"scores must be {shape[:3]} and valid {shape[:2]} for {t} tokens")
        valid = valid.to(self.device, torch.bool)
        v = torch.where(valid[:, :, None, None], v, torch.zeros_like(v))
        new = encode_recent(*rotate_kv(k, v, self.config), self.config)
        self.recent = {name: torch.cat([self.recent[name], new[name]]) for name in RECENT_NAMES}
        self.recent_scores = torch.cat([self.recent_scores, scores.to(self.device).float()])
        self.recent_valid = torch.cat([self.recent_valid, valid])
        self._finalise()

    def _finalise(self) -> None:
        """Compress the oldest ``window``-multiples while ``2 * window`` or more tokens are recent."""
        cfg = self.config
        if self.recent_len < 2 * cfg.window:
            return
        count = (self.recent_len - cfg.window) // cfg.window * cfg.window  # leaves window..2w-1
        old = {name: x[:count] for name, x in self.recent.items()}
        valid = self.recent_valid[:count]  # [count, b]
        scores = self.recent_scores[:count].masked_fill(~valid[:, :, None], float("-inf"))
        # K comes back from its int8 recent form: the original is no longer held.
        new = encode_chunks(decode_recent_k(old, self.head_dim), old["rv"], scores, cfg)
        self.windows = {name: torch.cat([self.windows[name], new[name]]) for name in new}
        per_chunk = valid.reshape(count // cfg.chunk, cfg.chunk, self.batch_size).sum(dim=1)  # [count/S, b]
        self.chunk_valid = torch.cat([self.chunk_valid, per_chunk.to(torch.uint8)])
        self.recent = {name: x[count:] for name, x in self.recent.items()}
        self.recent_scores = self.recent_scores[count:]
        self.recent_valid = self.recent_valid[count:]

    def accumulate_scores(self, recent_probs: torch.Tensor) -> None:
        """Add the attention the recent tokens received this step.

        Args:
            recent_probs: [b, h, r], ``r = recent_len`` (the trailing part of the probabilities
                over the tokens of the last :meth:`gather`), ``h`` = n_kv or n_q; query heads
                of one GQA group are summed.
        """
        b, h, r = recent_probs.shape
        n = self.num_kv_heads
        if b != self.batch_size or r != self.recent_len or h % n:
            raise KvprError(f"recent_probs {tuple(recent_probs.shape)} must be [b, h, {self.recent_len}]")
        probs = recent_probs.float().reshape(b, n, h // n, r).sum(dim=2)  # [b, n_kv, r]
        self.recent_scores = self.recent_scores + probs.permute(2, 0, 1).to(self.device)

    def anchor_keys(self) -> torch.Tensor:
        """Dequantised anchor keys of every chunk in the model's basis, float32 [b, n_kv, C, d]."""
        anchors = decode_anchor_keys(self.windows, self.config, self.head_dim)  # [C, b, n, d]
        if self.config.rotates_k:
            anchors = hadamard(anchors)  # un-rotated: H is its own inverse
        return anchors.permute(1, 2, 0, 3)

    def select_chunks(self, q: torch.Tensor, top_chunks: int | None = None) -> torch.Tensor:
        """Indices of the chunks to attend, scored by ``q . K_anchor``.

        Args:
            q: [b, n_q, d] query of this step (RoPE applied), ``n_q`` a multiple of ``n_kv``;
                query heads ``g * n_q / n_kv ...`` share KV head ``g`` and their scores are
                combined by ``config.gqa_reduce`` (max: a chunk any head needs is kept).
            top_chunks: default ``config.top_chunks``.
        Returns:
            int64 [b, n_kv, min(top_chunks, C)], best first; chunks of padding only score last.
        """
        b, n_q, d = q.shape
        n = self.num_kv_heads
        if b != self.batch_size or d != self.head_dim or n_q % n:
            raise KvprError(f"q {tuple(q.shape)} must be [b={self.batch_size}, n_q, d={self.head_dim}]")
        top = self.config.top_chunks if top_chunks is None else top_chunks
        qg = q.to(self.device).float().reshape(b, n, n_q // n, d)  # [b, n_kv, g, d]
        scores = torch.einsum("bngd,bncd->bngc", qg, self.anchor_keys())  # [b, n_kv, g, C]
        scores = scores.amax(dim=2) if self.config.gqa_reduce == "max" else scores.sum(dim=2)
        empty = (self.chunk_valid == 0).T  # [b, C]
        scores = scores.masked_fill(empty[:, None, :], float("-inf"))
        return scores.topk(min(top, self.num_chunks), dim=-1).indices

    def gather(self, selected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode the selected chunks and the recent window for attention.

        Args:
            selected: int64 [b, n_kv, m] chunk indices (from :meth:`select_chunks`); None: all.
        Returns:
            k, v in ``dtype`` [b, n_kv, m * chunk + r, d] and a bool mask [b, n_kv, m * chunk + r]
            (False: padding), in the model's basis. Chunk tokens come in stored order (anchor
            first), then the recent window in arrival order; attention does not depend on the order.
        """
        b, n, d, cfg = self.batch_size, self.num_kv_heads, self.head_dim, self.config
        if selected is None:
            selected = torch.arange(self.num_chunks, device=self.device).expand(b, n, -1)
        m, S, P = selected.shape[-1], cfg.chunk, cfg.anchors_per_group
        if selected.shape != (b, n, m):
            raise KvprError(f"selected {tuple(selected.shape)} must be [b, n_kv, m]")
        selected = selected.to(self.device)
        bi = torch.arange(b, device=self.device)[:, None, None]  # [b, 1, 1]
        hi = torch.arange(n, device=self.device)[None, :, None]  # [1, n_kv, 1]
        group = torch.div(selected, P, rounding_mode="floor")
        by_group = cfg.group_names()
        k_part = {  # [b, n, m, *]; the group's range where the differences are quantised per channel
            name: self.windows[name][group if name in by_group else selected, bi, hi] for name in _K_NAMES
        }
        k_sel = decode_k_chunks(k_part, cfg, d)  # [b, n, m, S, d]
        v_part = {name: self.windows[name][group, bi, hi] for name in by_group if name not in K_DIFF_RANGE}
        v_sel = decode_v_chunks(v_part, selected % P, cfg, d)  # [b, n, m, S, d]
        count = self.chunk_valid[selected, bi]  # [b, n, m]
        sel_mask = torch.arange(S, device=self.device) < count.unsqueeze(-1)  # [b, n, m, S]

        r = self.recent_len
        k_recent = decode_recent_k(self.recent, d).permute(1, 2, 0, 3)  # [b, n, r, d]
        v_recent = self.recent["rv"].permute(1, 2, 0, 3)
        recent_mask = self.recent_valid.T[:, None, :].expand(b, n, r)  # [b, n, r]
        k, v = rotate_kv(
            torch.cat([k_sel.reshape(b, n, m * S, d), k_recent], dim=2),
            torch.cat([v_sel.reshape(b, n, m * S, d), v_recent.float()], dim=2),
            cfg,
        )  # back in the model's basis
        k, v = k.to(self.dtype), v.to(self.dtype)
        mask = torch.cat([sel_mask.reshape(b, n, m * S), recent_mask], dim=2)
        return k, v, mask

    def nbytes(self) -> int:
        """Bytes held: packed windows, chunk validity and the recent window with its scores."""
        tensors = [
            *self.windows.values(),
            *self.recent.values(),
            self.chunk_valid,
            self.recent_scores,
            self.recent_valid,
        ]
        return sum(x.numel() * x.element_size() for x in tensors)

    def check_integrity(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (a bug, not a user error)."""
        cfg, C, r = self.config, self.num_chunks, self.recent_len
        assert self.num_tokens < 2 * cfg.window or r >= cfg.window, (self.num_tokens, r)
        assert r < 2 * cfg.window, r
        assert C % (cfg.window // cfg.chunk) == 0, C
        for name, x in self.windows.items():
            lead = C // cfg.anchors_per_group if name in cfg.group_names() else C
            assert x.shape[0] == lead and x.shape[1:3] == (self.batch_size, self.num_kv_heads), name
        for name, x in self.recent.items():
            assert x.shape[:3] == (r, self.batch_size, self.num_kv_heads), name
        assert self.recent_scores.shape == (r, self.batch_size, self.num_kv_heads)
        assert C == 0 or int(self.chunk_valid.max()) <= cfg.chunk
