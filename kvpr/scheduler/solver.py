"""Chooses the split ``l`` that minimises the cost model exactly, and how many tokens stay on the GPU.

The cost T(l) is not linear (rates vary with block size), so the solver is an exact branch and bound
over the grid of allowed ``l``:
1. cut [0, s] at every breakpoint of the terms (a rate curve's knots, or where a term's
   curvature changes sign), so on each cell every term is concave or convex;
2. bound T from below on a range by replacing each term with a line under it (its chord if concave,
   its tangent at the middle if convex): the bound is a max of two lines, minimised in closed form,
   and of the least host issue time on the range (X chunks at its start, K,V chunks at its end);
3. evaluate T on the grid where the bound is lowest, split ranges whose bound is below the best
   value found, and prune the rest.
The result equals the brute-force minimum over every allowed ``l`` (to a relative 1e-12).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpr.errors import KvprError
from kvpr.scheduler.cost_model import LayerShape, Schedule, StepModel, TimeTerm, step_model

if TYPE_CHECKING:
    from kvpr.config import ModelConfig
    from kvpr.scheduler.profile import HardwareProfile

_RTOL = 1e-12  # a range is pruned once its lower bound is within this of the best value
_LEAF_POINTS = 6  # ranges this small are evaluated point by point


@dataclass(frozen=True)
class SplitChoice:
    """The best split for one layer shape: recompute tokens [0, l), copy K,V of [l, s)."""

    recompute_len: int
    predicted_s: float  # T(l) of the chosen l
    copy_all_s: float  # T(0): copy every token's K,V

    @property
    def speedup(self) -> float:
        return self.copy_all_s / self.predicted_s if self.predicted_s > 0 else 1.0


@dataclass(frozen=True)
class _Grid:
    """Allowed splits: split_at(i) = i*granularity for i < count-1, and split_at(count-1) = s."""

    context_len: int
    granularity: int

    @property
    def count(self) -> int:
        return -(-self.context_len // self.granularity) + 1

    def split_at(self, index: int) -> int:
        return min(index * self.granularity, self.context_len)

    def index_at_or_below(self, split: float) -> int:
        """Largest index with split_at(index) <= split, for 0 <= split < s."""
        return min(int(math.floor(split / self.granularity)), self.count - 2)


class _Search:
    """One branch-and-bound solve; memoises term values per grid index."""

    def __init__(self, model: StepModel, grid: _Grid) -> None:
        self.model = model
        self.grid = grid
        self.terms: tuple[TimeTerm, ...] = model.terms
        self.values: dict[int, tuple[float, ...]] = {}
        self.best_index = 0
        self.best_s = math.inf

    def term_values(self, index: int) -> tuple[float, ...]:
        found = self.values.get(index)
        if found is None:
            split = self.grid.split_at(index)
            found = tuple(term.seconds(split) for term in self.terms)
            self.values[index] = found
        return found

    def visit(self, index: int) -> None:
        seconds = self.model.combine(self.grid.split_at(index), self.term_values(index))
        if seconds < self.best_s or (seconds == self.best_s and index < self.best_index):
            self.best_s, self.best_index = seconds, index

    def cells(self) -> list[tuple[int, int]]:
        """Index ranges whose hull lies inside one cell between consecutive breakpoints."""
        s = self.grid.context_len
        cuts = sorted({self.grid.index_at_or_below(p) for term in self.terms for p in term.breakpoints() if 0 < p < s})
        ranges, start = [], 0
        for cut in cuts:
            if cut >= start:
                ranges.append((start, cut))
                start = cut + 1
        ranges.append((start, self.grid.count - 1))
        return ranges

    def lower_bound(self, first: int, last: int) -> tuple[float, float]:
        """(min over [split_at(first), split_at(last)] of a max of two lines under T, where that minimum lies)."""
        la, lb = float(self.grid.split_at(first)), float(self.grid.split_at(last))
        mid = 0.5 * (la + lb)
        at_a, at_b = self.term_values(first), self.term_values(last)
        lines_a, lines_b = [], []  # each term's under-line, at la and at lb
        for term, fa, fb in zip(self.terms, at_a, at_b, strict=True):
            if term.curvature(mid) <= 0:  # concave or linear: the chord lies below
                lines_a.append(fa)
                lines_b.append(fb)
            else:  # convex: the tangent at the middle lies below
                fm, dm = term.seconds(mid), term.slope(mid)
                lines_a.append(fm + dm * (la - mid))
                lines_b.append(fm + dm * (lb - mid))
        wa, wb = self.model.branch_a, self.model.branch_b
        a_at_a = sum(w * v for w, v in zip(wa, lines_a, strict=True)) + self.model.fixed_a
        a_at_b = sum(w * v for w, v in zip(wa, lines_b, strict=True)) + self.model.fixed_a
        b_at_a = sum(w * v for w, v in zip(wb, lines_a, strict=True)) + self.model.fixed_b
        b_at_b = sum(w * v for w, v in zip(wb, lines_b, strict=True)) + self.model.fixed_b
        left, right = max(a_at_a, b_at_a), max(a_at_b, b_at_b)
        bound, where = (left, la) if left <= right else (right, lb)
        gap_a, gap_b = a_at_a - b_at_a, a_at_b - b_at_b
        if gap_a * gap_b < 0:  # the two lines cross inside: the max is lowest there
            t = gap_a / (gap_a - gap_b)
            cross = a_at_a + t * (a_at_b - a_at_a)
            if cross < bound:
                bound, where = cross, la + t * (lb - la)
        return max(bound, self.model.host_lower_bound(la, lb)), where

    def run(self) -> int:
        cells = self.cells()
        for first, last in cells:
            self.visit(first)
            self.visit(last)
        heap: list[tuple[float, int, int, float]] = []
        for first, last in cells:
            self.push(heap, first, last)
        while heap:
            bound, first, last, where = heapq.heappop(heap)
            if bound >= self.best_s * (1.0 - _RTOL):
                break  # every range left has a bound at least this high
            if last - first + 1 <= _LEAF_POINTS:
                for index in range(first + 1, last):
                    self.visit(index)
                continue
            near = min(max(self.grid.index_at_or_below(min(where, self.grid.context_len - 0.5)), first), last)
            self.visit(near)
            self.visit(min(near + 1, last))
            middle = (first + last) // 2
            self.visit(middle)
            self.push(heap, first, middle)
            self.push(heap, middle, last)
        return self.grid.split_at(self.best_index)

    def push(self, heap: list[tuple[float, int, int, float]], first: int, last: int) -> None:
        if last - first < 2:
            return  # both ends already visited
        bound, where = self.lower_bound(first, last)
        if bound < self.best_s * (1.0 - _RTOL):
            heapq.heappush(heap, (bound, first, last, where))


def solve_split(
    shape: LayerShape, profile: HardwareProfile, schedule: Schedule, num_chunks: int = 8, granularity: int = 1
) -> SplitChoice:
    """The l in [0, s] (a multiple of ``granularity``, or s) that minimises the predicted T(l)."""
    if granularity < 1:
        raise KvprError(f"granularity={granularity}: must be >= 1")
    model = step_model(shape, profile, schedule, num_chunks)
    copy_all = model.seconds(0)
    if shape.context_len == 0:
        return SplitChoice(0, copy_all, copy_all)
    best = _Search(model, _Grid(shape.context_len, granularity)).run()
    return SplitChoice(best, model.seconds(best), copy_all)


def resident_tokens(
    model: ModelConfig, batch_size: int, context_len: int, free_gpu_bytes: int, dtype_bytes: float, reserve_bytes: int
) -> int:
    """How many tokens' K,V (every layer, whole batch) fit in free GPU memory beyond ``reserve_bytes``.

    Those tokens stay resident and are never copied; the split applies to the rest.
    """
    if batch_size < 1 or context_len < 0:
        raise KvprError(f"batch_size={batch_size}, context_len={context_len}: need batch >= 1, context >= 0")
    if not (math.isfinite(dtype_bytes) and dtype_bytes > 0):
        raise KvprError(f"dtype_bytes={dtype_bytes}: must be a positive byte count per element")
    if free_gpu_bytes < 0 or reserve_bytes < 0:
        raise KvprError(f"free_gpu_bytes={free_gpu_bytes}, reserve_bytes={reserve_bytes}: must be >= 0")
    per_token = batch_size * model.num_layers * 2 * model.kv_size * dtype_bytes  # bytes of K and V
    spare = free_gpu_bytes - reserve_bytes
    if spare <= 0:
        return 0
    return min(context_len, int(spare // per_token))
