"""Accuracy harness: perplexity on essays and synthetic long-context tasks, read through ``kvpr.api``."""

from __future__ import annotations

from kvpr.eval.harness import evaluate, fp16_bytes_per_token, write_report
from kvpr.eval.perplexity import PerplexityResult, perplexity
from kvpr.eval.tasks import TASK_NAMES, TaskBuilder, TaskItem, score_answer

__all__ = [
    "TASK_NAMES",
    "PerplexityResult",
    "TaskBuilder",
    "TaskItem",
    "evaluate",
    "fp16_bytes_per_token",
    "perplexity",
    "score_answer",
    "write_report",
]
