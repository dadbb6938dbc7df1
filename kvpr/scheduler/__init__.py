"""Decides, never executes: hardware profile, cost model, split solver and the per-step plan."""

from kvpr.scheduler.cost_model import LayerShape, RateCurve, Schedule, step_s
from kvpr.scheduler.plan import SplitPlan, format_plans, plan_decode_step
from kvpr.scheduler.profile import HardwareProfile, default_profile_path
from kvpr.scheduler.profiler import load_or_measure, measure_profile
from kvpr.scheduler.solver import SplitChoice, resident_tokens, solve_split

__all__ = [
    "HardwareProfile",
    "LayerShape",
    "RateCurve",
    "Schedule",
    "SplitChoice",
    "SplitPlan",
    "default_profile_path",
    "format_plans",
    "load_or_measure",
    "measure_profile",
    "plan_decode_step",
    "resident_tokens",
    "solve_split",
    "step_s",
]
