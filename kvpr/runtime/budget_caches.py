"""The baselines KVO is compared with, as per-layer caches of the compressed executor.

- :class:`H2OCache`: heavy hitters + recent tokens, a fixed budget per head, the lightest older
  token evicted every step (accumulated attention decides).
- :class:`StreamingCache`: attention sinks + a sliding window, the same tokens for every head.
- :class:`QuestCache`: everything kept; each step reads the pages whose min/max keys bound
  ``q . k`` highest, within a token budget.

All three keep fp16 K,V (the model dtype) on the compute device. Keys are cached after RoPE at their
original positions (StreamingLLM's paper re-assigns positions inside the cache to run past the
trained context; within it, as here, the original positions are the exact ones).
"""

from __future__ import annotations

import torch

from kvpr.cache.storage import CacheShape
from kvpr.compress.methods import H2OConfig, QuestConfig, StreamingConfig
from kvpr.runtime.layer_caches import decode_attention


def _head_view(x: torch.Tensor) -> torch.Tensor:
    """Token-major [t, b, n_kv, d] -> [b, n_kv, t, d] (a view)."""
    return x.permute(1, 2, 0, 3)


class H2OCache:
    """H2O: per KV head, at most ``budget`` tokens between steps (``budget + 1`` while attending).

    Slots ``[b, n_kv, budget + 1]`` hold K, V, the token's slot index in the batch and its
    accumulated attention (prefill: from every later prompt query; decode: every step, the query
    heads of the KV head summed). After a step with every slot full, the older token (not among the
    ``recent`` newest) with the least accumulated attention is evicted; its slot takes the next token.
    """

    def __init__(self, config: H2OConfig, shape: CacheShape, device: torch.device) -> None:
        self.config, self.device = config, device
        b, n, d, cap = shape.batch_size, shape.num_kv_heads, shape.head_dim, config.budget + 1
        self.prefill_queries: int | None = shape.max_len  # every later query
        self.k = torch.zeros(b, n, cap, d, dtype=shape.dtype, device=device)  # [b, n_kv, B+1, d]
        self.v = torch.zeros_like(self.k)
        self.score = torch.zeros(b, n, cap, device=device)  # [b, n_kv, B+1] accumulated attention
        self.token = torch.full((b, n, cap), -1, dtype=torch.long, device=device)  # slot index in the batch
        self.valid = torch.zeros(b, n, cap, dtype=torch.bool, device=device)
        self.free = torch.zeros(b, n, dtype=torch.long, device=device)  # [b, n_kv] slot of the next token
        self.filled = 0  # slots ever used (equal for every head)
        self.length = 0  # tokens seen (batch slots, padding included)
        self.read_bytes = self.link_bytes = 0

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None:
        assert scores is not None
        t, b, n, d = k.shape
        budget, recent = self.config.budget, self.config.recent
        real = valid.T[:, None, :].expand(b, n, t)  # [b, n_kv, t]
        score = scores.permute(1, 2, 0)  # [b, n_kv, t]
        keep = torch.arange(t, device=self.device).expand(b, n, t)
        if t > budget:  # the recent tokens, plus the heaviest of the older ones (padding lightest)
            older = t - recent
            heavy = score[..., :older].masked_fill(~real[..., :older], float("-inf")).topk(budget - recent).indices
            keep = torch.cat([heavy, keep[..., older:]], dim=-1)  # [b, n_kv, budget]
        m = keep.shape[-1]
        index = keep.unsqueeze(-1).expand(b, n, m, d)
        self.k[:, :, :m] = _head_view(k).gather(2, index)
        self.v[:, :, :m] = _head_view(v).gather(2, index)
        self.score[:, :, :m] = score.gather(2, keep)
        self.token[:, :, :m] = keep
        self.valid[:, :, :m] = real.gather(2, keep)
        self.filled, self.length = m, t
        self.free.fill_(m)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, d = k.shape
        slot = self.free.unsqueeze(-1)  # [b, n_kv, 1]
        self.k.scatter_(2, slot.unsqueeze(-1).expand(b, n, 1, d), k.unsqueeze(2))
        self.v.scatter_(2, slot.unsqueeze(-1).expand(b, n, 1, d), v.unsqueeze(2))
        self.score.scatter_(2, slot, 0.0)
        self.token.scatter_(2, slot, self.length)
        self.valid.scatter_(2, slot, True)
        self.length += 1
        self.filled = min(self.filled + 1, self.config.budget + 1)
        used = self.filled
        keys, values = self.k[:, :, :used], self.v[:, :, :used]
        out, probs = decode_attention(q, keys, values, self.valid[:, :, :used], need_probs=True)
        assert probs is not None
        self.score[:, :, :used] += probs.sum(dim=2)  # the query heads of each KV head
        self.read_bytes = 2 * keys.numel() * keys.element_size()
        if used <= self.config.budget:
            self.free.fill_(used)
            return out
        # Evict: empty and padding slots first, never one of the ``recent`` newest tokens.
        lightest = self.score.masked_fill(~self.valid, float("-inf"))
        lightest = lightest.masked_fill(self.token >= self.length - self.config.recent, float("inf"))
        self.free = lightest.argmin(dim=-1)  # [b, n_kv]
        self.valid.scatter_(2, self.free.unsqueeze(-1), False)
        return out

    def nbytes(self) -> int:
        kept = min(self.filled, self.config.budget)
        return kept * self.k.shape[0] * self.k.shape[1] * (2 * self.k.shape[3] * self.k.element_size() + 4 + 8)


class StreamingCache:
    """StreamingLLM: per sequence, its first ``sink`` real tokens and its newest ``budget - sink``.

    Slots ``[b, n_kv, budget]`` (plus one scratch slot that dropped prompt tokens are written to):
    a sequence's real token of rank ``j`` (padding not counted) lives in slot ``j`` if ``j < sink``,
    else in ``sink + (j - sink) % window``, so each new token overwrites the oldest in the window.
    """

    prefill_queries: int | None = None

    def __init__(self, config: StreamingConfig, shape: CacheShape, device: torch.device) -> None:
        self.config, self.device = config, device
        b, n, d, cap = shape.batch_size, shape.num_kv_heads, shape.head_dim, config.budget
        self.k = torch.zeros(b, n, cap + 1, d, dtype=shape.dtype, device=device)  # [b, n_kv, budget+1, d]
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(b, cap + 1, dtype=torch.bool, device=device)  # [b, budget+1]
        self.seen = torch.zeros(b, dtype=torch.long, device=device)  # real tokens so far, per sequence
        self.link_bytes = 0

    def _slot(self, rank: torch.Tensor) -> torch.Tensor:
        sink, window = self.config.sink, self.config.window
        return torch.where(rank < sink, rank, sink + (rank - sink).remainder(window))

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None:
        t, b, n, d = k.shape
        real = valid.T  # [b, t]
        rank = real.long().cumsum(dim=1) - 1  # [b, t]: rank among the real tokens
        count = real.sum(dim=1, keepdim=True)  # [b, 1]
        newest = rank >= (count - self.config.window).clamp(min=self.config.sink)
        keep = real & ((rank < self.config.sink) | newest)
        slot = torch.where(keep, self._slot(rank.clamp(min=0)), self.config.budget)  # dropped -> scratch
        index = slot[:, None, :, None].expand(b, n, t, d)
        self.k.scatter_(2, index, _head_view(k))
        self.v.scatter_(2, index, _head_view(v))
        self.valid.scatter_(1, slot, keep)
        self.valid[:, self.config.budget] = False
        self.seen = count[:, 0]

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, d = k.shape
        slot = self._slot(self.seen)  # [b]
        index = slot[:, None, None, None].expand(b, n, 1, d)
        self.k.scatter_(2, index, k.unsqueeze(2))
        self.v.scatter_(2, index, v.unsqueeze(2))
        self.valid.scatter_(1, slot[:, None], True)
        self.seen = self.seen + 1
        cap = self.config.budget
        out, _ = decode_attention(q, self.k[:, :, :cap], self.v[:, :, :cap], self.valid[:, None, :cap])
        return out

    @property
    def read_bytes(self) -> int:
        """K,V bytes of the held tokens (one host read of the counts: for reports, not the step)."""
        held = int(self.seen.clamp(max=self.config.budget).sum())
        return 2 * held * self.k.shape[1] * self.k.shape[3] * self.k.element_size()

    def nbytes(self) -> int:
        return self.read_bytes


class QuestCache:
    """Quest: all K,V token-major ``[s_max, b, n_kv, d]`` plus per-page min and max keys; a step reads
    the newest (partial) page and the ``budget / page_size - 1`` pages of largest upper bound
    ``sum_d max(q_d * min_d, q_d * max_d)`` (query heads of a KV head combined by ``gqa_reduce``)."""

    prefill_queries: int | None = None

    def __init__(self, config: QuestConfig, shape: CacheShape, device: torch.device) -> None:
        self.config, self.device = config, device
        b, n, d = shape.batch_size, shape.num_kv_heads, shape.head_dim
        size = (shape.max_len, b, n, d)
        self.k = torch.zeros(size, dtype=shape.dtype, device=device)  # [s_max, b, n_kv, d]
        self.v = torch.zeros_like(self.k)
        self.valid = torch.zeros(b, shape.max_len, dtype=torch.bool, device=device)  # [b, s_max]
        pages = -(-shape.max_len // config.page_size)
        self.kmin = torch.zeros(pages, b, n, d, dtype=shape.dtype, device=device)  # [P_max, b, n_kv, d]
        self.kmax = torch.zeros_like(self.kmin)
        self.page_real = torch.zeros(pages, b, dtype=torch.bool, device=device)  # any real token in the page
        self.length = 0
        self.read_bytes = self.link_bytes = 0

    def _close_pages(self, first: int, last: int) -> None:
        """Min and max keys over the real tokens of full pages [first, last)."""
        ps = self.config.page_size
        keys = self.k[first * ps : last * ps].unflatten(0, (last - first, ps))  # [p, ps, b, n_kv, d]
        real = self.valid[:, first * ps : last * ps].T.unflatten(0, (last - first, ps))[..., None, None]
        inf = torch.tensor(float("inf"), dtype=keys.dtype, device=self.device)
        self.kmin[first:last] = torch.where(real, keys, inf).amin(dim=1)
        self.kmax[first:last] = torch.where(real, keys, -inf).amax(dim=1)
        self.page_real[first:last] = real[..., 0, 0].any(dim=1)

    def prefill(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor | None) -> None:
        t = k.shape[0]
        self.k[:t], self.v[:t] = k, v
        self.valid[:, :t] = valid.T
        self.length = t
        if t // self.config.page_size:
            self._close_pages(0, t // self.config.page_size)

    def decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ps, slot = self.config.page_size, self.length
        self.k[slot], self.v[slot] = k, v
        self.valid[:, slot] = True
        self.length += 1
        if self.length % ps == 0:
            self._close_pages(slot // ps, slot // ps + 1)
        newest = (self.length - 1) // ps  # the page of the new token: always read
        pages = min(self.config.budget // ps - 1, newest)
        b, n, d = k.shape
        if pages == newest:  # the budget covers every page: attend densely
            keys, values = _head_view(self.k[: self.length]), _head_view(self.v[: self.length])
            mask = self.valid[:, None, : self.length]
            self.read_bytes = 2 * keys.numel() * keys.element_size()
        else:
            chosen = self._select(q, newest, pages)  # [b, n_kv, pages]
            token = (chosen.unsqueeze(-1) * ps + torch.arange(ps, device=self.device)).reshape(b, n, pages * ps)
            index = token.unsqueeze(-1).expand(b, n, pages * ps, d)
            tail = slice(newest * ps, self.length)
            keys = torch.cat([_head_view(self.k).gather(2, index), _head_view(self.k[tail])], dim=2)
            values = torch.cat([_head_view(self.v).gather(2, index), _head_view(self.v[tail])], dim=2)
            chosen_real = self.valid.gather(1, token.reshape(b, -1)).reshape(b, n, pages * ps)
            mask = torch.cat([chosen_real, self.valid[:, None, tail].expand(b, n, -1)], dim=2)
            meta = 2 * newest * b * n * d * self.kmin.element_size()
            self.read_bytes = 2 * keys.numel() * keys.element_size() + meta
        out, _ = decode_attention(q, keys, values, mask)
        return out

    def _select(self, q: torch.Tensor, num_pages: int, top: int) -> torch.Tensor:
        """The ``top`` full pages (of the first ``num_pages``) with the largest upper bound of q . k."""
        b, n, d = self.k.shape[1:]
        qg = q.float().reshape(b, n, -1, 1, d)  # [b, n_kv, g, 1, d]
        lo = _head_view(self.kmin[:num_pages]).float().unsqueeze(2)  # [b, n_kv, 1, P, d]
        hi = _head_view(self.kmax[:num_pages]).float().unsqueeze(2)
        bound = torch.maximum(qg * lo, qg * hi).sum(dim=-1)  # [b, n_kv, g, P]
        bound = bound.amax(dim=2) if self.config.gqa_reduce == "max" else bound.sum(dim=2)
        bound = bound.masked_fill(~self.page_real[:num_pages].T[:, None, :], float("-inf"))
        return bound.topk(top, dim=-1).indices

    def nbytes(self) -> int:
        per_token = self.k[0].numel() * self.k.element_size()
        return 2 * self.length * per_token + 2 * (self.length // self.config.page_size) * per_token
