"""What ``LLM.generate`` returns: each prompt's ``Completion``, and ``RunStats``, what a batch cost
(prefill, each decode step, the split chosen at each step), which the CLI and benchmarks report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kvpr.runtime.generation import GenerationOutput


@dataclass
class Completion:
    """One prompt's result."""

    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" or "length"


@dataclass
class RunStats:
    """What one batch cost: prefill, each decode step, and the split chosen at each step."""

    batch_size: int
    prompt_len: int
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    recompute_lens: list[int] = field(default_factory=list)  # l at each decode step
    host_lens: list[int] = field(default_factory=list)  # host-tier tokens at each decode step

    @classmethod
    def combine(cls, blocks: Sequence["RunStats"]) -> "RunStats":
        """Blocks run one after another: the job's step k costs step k of every block."""
        if len(blocks) == 1:
            return blocks[0]
        num_steps = max(len(b.step_s) for b in blocks)
        return cls(
            batch_size=sum(b.batch_size for b in blocks),
            prompt_len=max(b.prompt_len for b in blocks),
            prefill_s=sum(b.prefill_s for b in blocks),
            step_s=[sum(b.step_s[k] for b in blocks if k < len(b.step_s)) for k in range(num_steps)],
            recompute_lens=blocks[-1].recompute_lens,
            host_lens=blocks[-1].host_lens,
        )

    def to_dict(self) -> dict[str, Any]:
        steps = self.step_s
        return {
            "batch_size": self.batch_size,
            "prompt_len": self.prompt_len,
            "prefill_s": self.prefill_s,
            "decode_ms_per_token": 1e3 * sum(steps) / len(steps) if steps else None,
            "step_ms": [1e3 * s for s in steps],
            "recompute_lens": self.recompute_lens,
            "host_lens": self.host_lens,
        }


def run_stats(output: GenerationOutput, shape: torch.Size) -> RunStats:
    return RunStats(
        batch_size=shape[0],
        prompt_len=shape[1],
        prefill_s=output.prefill_s,
        step_s=output.step_s,
        recompute_lens=output.recompute_lens,
        host_lens=output.host_lens,
    )
