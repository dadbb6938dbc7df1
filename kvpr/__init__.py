"""kvpr: LLM inference with an offloaded KV cache, partial KV recomputation and KV compression."""

from kvpr.api import LLM
from kvpr.config import EngineConfig, SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams"]
