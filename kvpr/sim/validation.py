"""Predicted against measured: the GPU model (gpu.py) on every committed H200 decode row it can model.

Each row names the results file it was measured in, the profile files whose rates the prediction
used, and ``error = predicted / measured - 1``. Splits ``(l, c)`` are the row's recorded recompute
lengths with the chunk count the run's policy picks for them (kvpr's own solver on the same profile).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvpr.sim.gpu import GpuMachine, hf_ms, kvpr_kvo_ms, kvpr_offloaded_ms

TOLERANCE = 0.15
RESULTS = Path("benchmarks/results")


@dataclass(frozen=True)
class Source:
    """A measured results file and the profiles of its models (by (model family, batch))."""

    results: str
    profiles: dict[tuple[str, int], tuple[str, str | None]]


H200_SOURCES = (
    Source(
        "latency-NVIDIA_H200-20261203.json",
        {
            ("opt", 32): ("profile-opt-h4096-kv8192-float16-b32-NVIDIA_H200-20261203.json", None),
            ("opt", 16): (
                "profile-opt-h4096-kv8192-float16-b16-NVIDIA_H200-20261202.json",
                "profile-opt-h4096-kv8192-float16-b32-NVIDIA_H200-20261203.json",
            ),
            ("llama", 16): ("profile-llama-h4096-kv2048-float16-b16-NVIDIA_H200-20261203.json", None),
        },
    ),
    Source(
        "history/latency-paper-NVIDIA_H200-20261202.json",
        {("opt", 32): ("profile-opt-h4096-kv8192-float16-b32-NVIDIA_H200-20261203.json", None)},
    ),
)
SYSTEM_CODECS = {  # system -> (x codec, K,V codec) of kvpr's tokenwise host tier
    "kvpr-off": ("none", "none"),
    "kvpr-auto": ("none", "none"),
    "kvpr-x4": ("int4", "none"),
    "kvpr-int4": ("none", "int4"),
}


def _chunks(gpu: GpuMachine, model: Any, b: int, s: int, x_codec: str, kv_codec: str) -> int:
    """The chunk count kvpr's auto policy picks at context ``s`` with this profile."""
    import torch

    from kvpr.cache.codec import make_x_codec
    from kvpr.cache.storage import tier_codec
    from kvpr.scheduler.policy import auto_policy, stored_element_bytes

    x_bytes, kv_bytes = stored_element_bytes(
        model, torch.float16, tier_codec(kv_codec, model.head_dim), make_x_codec(x_codec, model.hidden_size)
    )
    return auto_policy(model, b, gpu.profile, x_bytes, kv_bytes, None, x_codec, kv_codec)(s).num_chunks


def predict_row(row: dict[str, Any], gpu: GpuMachine) -> tuple[float, str] | None:
    """(predicted ms, the model used) for a measured row, or None for a system the model does not cover."""
    from kvpr.models.registry import builtin_config

    model = builtin_config(row["model"])
    b, prompt, gen, system = row["batch_size"], row["prompt_len"], row["gen_len"], row["system"]
    steps = gen - 1
    if system in SYSTEM_CODECS:
        x_codec, kv_codec = SYSTEM_CODECS[system]
        lens = row.get("recompute_lens") or [0] * steps
        splits = [(n, _chunks(gpu, model, b, prompt + k, x_codec, kv_codec) if n else 1) for k, n in enumerate(lens)]
        return kvpr_offloaded_ms(
            gpu, model, b, prompt, splits, x_codec, kv_codec
        ), "kvpr offloaded, per layer max(copy, compute, host)"
    if system == "kvpr-kvo-compile":
        return kvpr_kvo_ms(gpu, model, b, prompt, steps), "kvpr KVO rows in host memory, zero-copy gather"
    if system in ("hf-offloaded", "hf-gpu"):
        return hf_ms(
            gpu, model, b, prompt, steps, system == "hf-offloaded"
        ), "transformers' cache (device and link only)"
    return None


def validation_rows(root: Path) -> list[dict[str, Any]]:
    """Every modelled row of the H200 sources, predicted."""
    rows = []
    for source in H200_SOURCES:
        measured = json.loads((root / RESULTS / source.results).read_text())
        for row in measured["rows"]:
            if row.get("timed") is False or row["system"] == "floor" or not row.get("decode_ms_per_token"):
                continue
            family = "llama" if row["model"].startswith("llama") else "opt"
            paths = source.profiles.get((family, row["batch_size"]))
            if paths is None:
                continue
            gpu = GpuMachine.load(root / RESULTS / paths[0], None if paths[1] is None else root / RESULTS / paths[1])
            predicted = predict_row(row, gpu)
            if predicted is None:
                continue
            ms, how = predicted
            measured_ms, b = row["decode_ms_per_token"], row["batch_size"]
            rows.append({
                "workload": f"{row['model']} {b} x {row['prompt_len']} + {row['gen_len']}, {row['system']}",
                "predicted_ms": round(ms, 3),
                "measured_ms": round(measured_ms, 3),
                "measured_range_ms": [row.get("decode_ms_per_token_min"), row.get("decode_ms_per_token_max")],
                "error": round(ms / measured_ms - 1, 4),
                "within_tolerance": abs(ms / measured_ms - 1) <= TOLERANCE,
                "model": how,
                "measured_source": f"benchmarks/results/{source.results}",
                "measured_commit": measured.get("commit"),
                "profiles": [f"benchmarks/results/{name}" for name in gpu.sources],
            })  # fmt: skip
    return rows
