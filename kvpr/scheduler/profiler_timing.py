"""How each profiler measurement is sized and timed: the ladder of sizes, the clock, the progress bar.

Kept apart so that profiler.py reads as what is measured, not how it is timed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvpr.config import ModelConfig
from kvpr.device import element_size

MIB = 1 << 20
Clock = Callable[[Callable[[], object]], float]


@dataclass(frozen=True)
class Ladder:
    """Sizes and time budgets of one measurement run."""

    copy_bytes: tuple[int, ...]
    gemm_rows: tuple[int, ...]
    attention_lens: tuple[int, ...]
    min_time_s: float  # time each point for at least this long, after a warm-up
    phase_budget_s: float  # stop a ladder once its phase has taken this long
    layer_weight_bytes: int  # time the layer's GEMMs only if its weights fit in this


def measurement_ladder(device: torch.device, model: ModelConfig, dtype: torch.dtype, batch_size: int) -> Ladder:
    """CUDA: 1..256 MiB chunks and GEMMs to 64K rows, capped by free memory; CPU: tiny and quick."""
    elem = element_size(dtype)
    kv_row = 2 * model.num_kv_heads * model.head_dim * elem * batch_size  # K,V bytes per token
    row = (model.hidden_size + 2 * model.kv_size) * elem  # bytes of one GEMM input + output row
    if device.type != "cuda":
        budget = 64 * MIB
        rows = tuple(4**k for k in range(6) if 4**k * row <= budget)
        lens = tuple(s for s in (64, 256, 1024, 4096) if s <= model.max_position and s * kv_row <= budget)
        return Ladder(
            tuple(MIB // 4 * 4**k for k in range(4)),
            rows or (1,),
            lens or (min(64, model.max_position),),
            min_time_s=0.01,
            phase_budget_s=0.25,
            layer_weight_bytes=budget,
        )
    free, _ = torch.cuda.mem_get_info(device)
    budget = free // 4
    copies = tuple(MIB << k for k in range(9) if MIB << k <= budget) or (MIB,)
    rows = tuple(16 << k for k in range(13) if (16 << k) * row <= budget)
    lens = tuple(s for s in (128 << k for k in range(9)) if s <= model.max_position and s * kv_row <= budget)
    return Ladder(
        copies, rows or (16,), lens or (128,), min_time_s=0.05, phase_budget_s=60.0, layer_weight_bytes=budget
    )


def timer(device: torch.device, min_time_s: float) -> Clock:
    """Seconds per call of ``fn``: warm up, then time ever more repeats until one run lasts ``min_time_s``."""

    def time_cuda(fn: Callable[[], object]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):
            fn()  # warm-up: allocator, kernel choice, clocks
        reps = 1
        while True:
            start.record()  # both events on the current stream: they bracket exactly the repeats
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
            if elapsed >= min_time_s or reps >= 1 << 12:
                return elapsed / reps
            reps = min(1 << 12, max(2 * reps, math.ceil(reps * min_time_s / max(elapsed, 1e-7))))

    def time_cpu(fn: Callable[[], object]) -> float:
        fn()  # warm-up: first touch of pages, kernel choice
        reps = 1
        while True:
            begin = time.perf_counter()
            for _ in range(reps):
                fn()
            elapsed = time.perf_counter() - begin
            if elapsed >= min_time_s or reps >= 1 << 12:
                return elapsed / reps
            reps = min(1 << 12, max(2 * reps, math.ceil(reps * min_time_s / max(elapsed, 1e-7))))

    return time_cuda if device.type == "cuda" else time_cpu


class Progress:
    """A rich progress bar per measurement phase when enabled; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def phase(self, name: str, total: int) -> None:
        if self._bar is not None:
            self._task = self._bar.add_task(name, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)


def ladder_points(
    sizes: tuple[int, ...], budget_s: float, measure: Callable[[int], float], progress: Progress
) -> list[tuple[int, float]]:
    """measure(size) for increasing sizes until the phase's time budget is spent (at least one)."""
    began, points = time.perf_counter(), []
    for size in sizes:
        points.append((size, measure(size)))
        progress.advance()
        if time.perf_counter() - began > budget_s:
            break
    return points
