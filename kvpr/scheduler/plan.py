"""The frozen decision the runtime executes each decode step, and the table ``kvpr plan`` prints.

Every layer of a model has the same cache shape, so one SplitPlan (times per layer) serves the whole
step; the runtime asks again as ``s`` grows.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpr.scheduler.cost_model import LayerShape, Schedule, floor_s
from kvpr.scheduler.solver import solve_split

if TYPE_CHECKING:
    from kvpr.config import ModelConfig
    from kvpr.scheduler.profile import HardwareProfile


@dataclass(frozen=True)
class StepSplit:
    """What the runtime executes in one decode step: K,V of the first ``recompute_len`` offloaded
    tokens recomputed from X, copied and recomputed in ``num_chunks`` pipelined chunks; the rest's
    K,V copied."""

    recompute_len: int
    num_chunks: int = 1


@dataclass(frozen=True)
class SplitPlan:
    """Recompute K,V of tokens [0, recompute_len) from X, copy K,V of [recompute_len, context_len).

    Times are predicted seconds per layer: this plan, copying all K,V, and the floor of this split
    (its PCIe bytes at peak bandwidth, or its recompute FLOPs at peak GEMM rate, whichever is larger).
    """

    recompute_len: int
    context_len: int
    schedule: Schedule
    predicted_s: float
    predicted_full_copy_s: float
    predicted_floor_s: float
    num_chunks: int = 1  # X chunks of the recompute pipeline (1 under the sequential schedule)

    @property
    def copy_len(self) -> int:
        return self.context_len - self.recompute_len

    @property
    def speedup(self) -> float:
        """Predicted gain over copying every token's K,V."""
        return self.predicted_full_copy_s / self.predicted_s if self.predicted_s > 0 else 1.0

    @property
    def step_split(self) -> StepSplit:
        return StepSplit(self.recompute_len, self.num_chunks)


# The chunk counts the scheduler chooses among when --num-chunks is auto: more chunks overlap the
# recompute with the X copy better, fewer cost the host less to issue.
CHUNK_CHOICES = (1, 2, 4, 8, 16)


def plan_decode_step(
    model: ModelConfig,
    batch_size: int,
    context_len: int,
    profile: HardwareProfile,
    kv_bytes_per_elem: float,
    x_bytes_per_elem: float,
    schedule: Schedule,
    num_chunks: int | None,
    granularity: int = 1,
    x_codec: str = "none",
    kv_codec: str = "none",
    resident_len: int = 0,
) -> SplitPlan:
    """The best split of the ``context_len`` offloaded tokens for one decode step (cheap: ~0.1-1 ms
    per chunk count). ``num_chunks=None`` (chunked schedule) also picks the chunk count from
    ``CHUNK_CHOICES``, the fewest among equals.

    Element sizes are those stored on the host (a codec may make them fractional); ``x_codec`` and
    ``kv_codec`` name their codecs, whose decodes the recompute and the K,V load then cost;
    ``resident_len`` tokens of the GPU tier are attended beside them.
    """
    shape = LayerShape(
        batch_size,
        context_len,
        model.hidden_size,
        model.kv_size,
        x_bytes_per_elem,
        kv_bytes_per_elem,
        x_codec,
        kv_codec,
        resident_len,
    )
    if schedule is Schedule.SEQUENTIAL:
        counts: tuple[int, ...] = (1,)
    else:
        counts = CHUNK_CHOICES if num_chunks is None else (num_chunks,)
    solved = [(solve_split(shape, profile, schedule, count, granularity), count) for count in counts]
    choice, count = min(solved, key=lambda found: found[0].predicted_s)  # first (fewest chunks) of ties
    return SplitPlan(
        choice.recompute_len,
        context_len,
        schedule,
        choice.predicted_s,
        choice.copy_all_s,
        floor_s(shape, profile, choice.recompute_len),
        count if choice.recompute_len else 1,
    )


def format_plans(
    model: ModelConfig,
    batch_size: int,
    context_lens: Sequence[int],
    profile: HardwareProfile,
    kv_bytes_per_elem: float,
    x_bytes_per_elem: float,
    num_chunks: int | None,
    x_codec: str = "none",
    kv_codec: str = "none",
    gpu_tokens: int = 0,
) -> str:
    """A table, per context length, of the three tiers (``gpu_tokens`` on the GPU, the rest on the
    host: recomputed from X or copied) and the predicted ms per layer: copy all, best sequential,
    best chunked (with its chunk count, chosen when ``num_chunks`` is None), floor."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(
            f"{model.model_type}: h={model.hidden_size}, K,V width={2 * model.kv_size}, batch {batch_size}, "
            f"X {x_bytes_per_elem:g} B/elem, K,V {kv_bytes_per_elem:g} B/elem, on {profile.device_name}"
        ),
        caption=(
            f"predicted ms per layer (x{model.num_layers} layers per step); GPU r = tokens kept on the GPU, "
            "attended in place; host h = the rest; l = host tokens recomputed from X, h - l copied; "
            "floor = the best plan's PCIe bytes at peak bandwidth or FLOPs at the peak recompute rate; "
            "c = X chunks; times include the host's time to issue the layer where the profile has it "
            "and steps do not replay as CUDA graphs"
        ),
    )
    for header in (
        "context s",
        "GPU r",
        "host h",
        "copy all K,V",
        "sequential: l/h",
        "ms",
        "x",
        f"chunked ({'auto' if num_chunks is None else num_chunks}): l/h",
        "c",
        "ms",
        "x",
        "floor ms",
    ):
        table.add_column(header, justify="right")
    for context_len in context_lens:
        resident = min(gpu_tokens, context_len)
        host_len = context_len - resident
        plans = [
            plan_decode_step(
                model,
                batch_size,
                host_len,
                profile,
                kv_bytes_per_elem,
                x_bytes_per_elem,
                schedule,
                num_chunks,
                x_codec=x_codec,
                kv_codec=kv_codec,
                resident_len=resident,
            )
            for schedule in (Schedule.SEQUENTIAL, Schedule.CHUNKED)
        ]
        best = min(plans, key=lambda plan: plan.predicted_s)
        row = [str(context_len), str(resident), str(host_len), f"{plans[1].predicted_full_copy_s * 1e3:.3f}"]
        for plan in plans:
            fraction = plan.recompute_len / host_len if host_len else 0.0
            chunks = [str(plan.num_chunks)] if plan.schedule is Schedule.CHUNKED else []
            row += [f"{fraction:.3f}", *chunks, f"{plan.predicted_s * 1e3:.3f}", f"{plan.speedup:.2f}"]
        table.add_row(*row, f"{best.predicted_floor_s * 1e3:.3f}")
    out = io.StringIO()
    Console(file=out, width=160, color_system=None, force_terminal=False).print(table)
    return out.getvalue()
