"""Budgets that put the token-evicting and page-reading baselines at KVO's bytes per token.

KVO's footprint depends on the context (the recent window and the anchors of every chunk), so a
fair comparison sizes H2O's and StreamingLLM's token budgets to store as many bytes per token as
KVO does at that context, and Quest's read budget to read as many per decode step; metadata and
dense layers count on both sides (``CacheMethod.footprint``).
"""

from __future__ import annotations

from typing import Any

from kvpr.compress.methods import Params, method_config
from kvpr.config import ModelConfig
from kvpr.runtime.compressed import CacheMethod

MATCHED_METHODS = ("h2o", "streaming", "quest")


def footprint(name: str, params: Params | dict[str, Any], model: ModelConfig, context_len: int) -> tuple[float, float]:
    """(stored, read per step) bytes per token of context of method ``name``, all layers."""
    return CacheMethod(name, method_config(name, params), model).footprint(context_len)


def _budget_params(name: str, budget: int) -> dict[str, int]:
    return {"budget": budget, "recent": budget // 2} if name == "h2o" else {"budget": budget}


def matched_budget(name: str, model: ModelConfig, context_len: int, target: float) -> int:
    """The largest budget of ``name`` whose bytes per token stay within ``target``: stored bytes for
    H2O and StreamingLLM, read bytes for Quest. Steps of 8 tokens (Quest: of a page), at least one
    step (Quest: two pages, its newest and one more)."""
    if name not in MATCHED_METHODS:
        raise ValueError(f"{name} has no token budget to match; use one of {MATCHED_METHODS}")
    which = 1 if name == "quest" else 0
    step = method_config("quest").page_size if name == "quest" else 8
    best = 2 * step if name == "quest" else step
    for budget in range(best + step, context_len + 1, step):
        if footprint(name, _budget_params(name, budget), model, context_len)[which] > target:
            break
        best = budget
    return best


def matched_specs(model: ModelConfig, context_len: int, kvo_params: Params = ()) -> dict[str, str]:
    """``--codecs`` specs of H2O, StreamingLLM (KVO's stored bytes) and Quest (KVO's read bytes)."""
    stored, read = footprint("kvo", kvo_params, model, context_len)
    specs = {}
    for name in MATCHED_METHODS:
        budget = matched_budget(name, model, context_len, read if name == "quest" else stored)
        specs[name] = name + ":" + ",".join(f"{k}={v}" for k, v in _budget_params(name, budget).items())
    return specs
