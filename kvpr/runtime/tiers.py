"""Where each cached token of a latency-mode batch lives: a GPU tier and a host tier.

The GPU tier has ``gpu_slots`` slots per layer. Its first ``prefix_cap`` slots hold the oldest
tokens for good; the rest are the tail, where every new token is written. When the tail is full
it is flushed to the host tier in one block (one copy per stored part and layer, never one per
token), and the next tokens fill it again. The host tier holds the tokens in between::

    tokens   [0, prefix)        [prefix, prefix + host)          [prefix + host, s)
    tier     GPU slots 0..      host slots 0..                   GPU slots prefix_cap..

The prefix grows with the prompt (or with new tokens) up to ``prefix_cap``; only then do tokens
reach the host, so while ``prefix < prefix_cap`` the host and the tail are empty, and the GPU
tokens always occupy slots ``[0, gpu_len)``: one piece, attended in place. Attention does not
depend on the order of keys (RoPE is applied before caching), so the tail may follow the prefix
in the slots even though host tokens lie between them in the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvpr.errors import KvprError

DEFAULT_FLUSH_BLOCK = 64  # tokens per tail flush: one D2H copy per part and layer every 64 steps


@dataclass(frozen=True)
class TierPlan:
    """Slot counts of both tiers for a batch of ``max_len`` slots (see the module docstring)."""

    max_len: int
    gpu_slots: int  # per layer, prefix and tail
    prefix_cap: int  # tokens that stay on the GPU for good
    host_slots: int  # tokens the host tier can take

    @classmethod
    def for_capacity(cls, capacity: int, max_len: int, flush_block: int = DEFAULT_FLUSH_BLOCK) -> TierPlan:
        """``capacity`` tokens' K,V on the GPU (at least one flush block: new tokens are written
        there); all of them when ``capacity >= max_len``, and then no host tier at all."""
        if capacity < 0 or max_len < 1 or flush_block < 1:
            raise KvprError(
                f"GPU capacity {capacity}, max_len {max_len}, flush block {flush_block}: need >= 0, >= 1, >= 1"
            )
        if capacity >= max_len:
            return cls(max_len, max_len, max_len, 0)
        tail = min(flush_block, max_len)
        gpu_slots = max(capacity, tail)
        prefix_cap = gpu_slots - tail
        return cls(max_len, gpu_slots, prefix_cap, max_len - prefix_cap)

    @property
    def tail_slots(self) -> int:
        return self.gpu_slots - self.prefix_cap

    @property
    def offloads(self) -> bool:
        """Whether any token can reach the host tier."""
        return self.host_slots > 0


@dataclass
class TierState:
    """Token counts of each tier as a batch runs (``TierPlan`` fixes the capacities)."""

    plan: TierPlan
    prefix: int = 0  # tokens [0, prefix) in GPU slots [0, prefix)
    host: int = 0  # tokens [prefix, prefix + host) in host slots [0, host)
    tail: int = 0  # the newest tokens, in GPU slots [prefix_cap, prefix_cap + tail)

    @property
    def length(self) -> int:
        return self.prefix + self.host + self.tail

    @property
    def gpu_len(self) -> int:
        """GPU slots in use: [0, gpu_len) holds the prefix, then the tail."""
        return self.prefix + self.tail

    def place_prompt(self, num_tokens: int) -> tuple[int, int]:
        """The first ``num_tokens`` tokens: returns (to the GPU prefix, to the host tier)."""
        assert self.length == 0
        self.prefix = min(num_tokens, self.plan.prefix_cap)
        self.host = num_tokens - self.prefix
        if self.host > self.plan.host_slots:
            raise ValueError(f"{num_tokens} tokens exceed the {self.plan.max_len} slots of the batch")
        return self.prefix, self.host

    def next_gpu_slot(self) -> int:
        """The GPU slot of the next token (it grows the prefix until that is full, then the tail)."""
        if self.length >= self.plan.max_len:
            raise ValueError(f"cache holds {self.plan.max_len} slots; all are used")
        if self.prefix < self.plan.prefix_cap:
            assert self.host == 0 and self.tail == 0
            return self.prefix
        return self.plan.prefix_cap + self.tail

    def add_token(self) -> None:
        if self.prefix < self.plan.prefix_cap:
            self.prefix += 1
        else:
            self.tail += 1

    def tail_full(self) -> bool:
        """The tail has no room for a next token and one may still come: flush it now."""
        full = self.tail == self.plan.tail_slots > 0 and self.length < self.plan.max_len
        assert not full or self.host + self.tail <= self.plan.host_slots  # host_slots = max_len - prefix_cap
        return full

    def flushed(self) -> None:
        """The tail's tokens now live on the host (after its copy)."""
        self.host += self.tail
        self.tail = 0
