"""Medians with their range: one run of a benchmark is an anecdote, so every timed figure is the
median of independent repeats, written beside its min, max and the raw values."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def spread(name: str, values: Sequence[float]) -> dict[str, Any]:
    """``{name: median, name_min, name_max, name_runs: values}``; an empty list gives None for each."""
    runs = [float(value) for value in values]
    if not runs:
        return {name: None, f"{name}_min": None, f"{name}_max": None, f"{name}_runs": []}
    return {name: statistics.median(runs), f"{name}_min": min(runs), f"{name}_max": max(runs), f"{name}_runs": runs}


def aggregate(runs: Sequence[dict[str, Any]], timed: Iterable[str]) -> dict[str, Any]:
    """One row from repeated runs: each key in ``timed`` as ``spread``; other keys from the first run."""
    timed = tuple(timed)
    row = {key: value for key, value in runs[0].items() if key not in timed} if runs else {}
    for key in timed:
        row.update(spread(key, [run[key] for run in runs if run.get(key) is not None]))
    row["repeats"] = len(runs)
    return row
