"""``kvpr profile`` and ``kvpr plan``: the subcommands that read a model's shape, never its weights.

Kept apart from cli.py (argparse and the commands that run a model) so each file stays short.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from kvpr.cli_checks import check_output_path, format_rate
from kvpr.config import EngineConfig, RuntimeConfig, parse_num_chunks
from kvpr.throughput_config import ThroughputConfig

if TYPE_CHECKING:
    from kvpr.scheduler.cost_model import RateCurve
    from kvpr.scheduler.profile import HardwareProfile


def model_config(name: str | None) -> Any:
    """The configuration of ``--model`` without loading weights."""
    from kvpr.models.loader import resolve_source

    return resolve_source(name, dummy_weights=True).config


def run_profile(args: argparse.Namespace) -> int:
    """Measure (or reuse) this machine's profile, print what was measured and where it is kept."""
    import torch

    from kvpr.device import resolve_device, resolve_dtype
    from kvpr.scheduler.profile import default_profile_path, device_name, profile_shape
    from kvpr.scheduler.profiler import load_or_measure

    explicit = check_output_path(args.profile, "--profile") if args.profile is not None else None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    cfg = model_config(args.model)
    target = explicit or default_profile_path(device_name(device), str(torch.__version__), profile_shape(cfg, dtype))
    before = target.stat().st_mtime_ns if target.exists() else None
    profile = load_or_measure(
        device,
        cfg,
        dtype,
        args.batch_size,
        path=explicit,
        reprofile=args.reprofile or explicit is not None,
        progress=True,
    )
    print(format_profile(profile))
    if target.exists() and target.stat().st_mtime_ns != before:
        print(f"profile written to {target}")
    else:
        print(f"profile read from {target} (cached; --reprofile measures again)")
    return 0


def format_profile(profile: HardwareProfile) -> str:
    """Each curve at the sizes it was measured at ('-' where one curve of a row was not), with SI
    units, so no rate prints as 0.0 and no extrapolated value looks measured."""
    lines = [f"profile of {profile.device_name} (torch {profile.torch_version}, {profile.dtype})"]
    lines.append("  pinned copies, at each measured chunk size (-: not measured):")
    lines += _curve_rows({"H2D": profile.h2d, "D2H": profile.d2h}, "B/s", lambda size: f"{size / 2**20:8g} MiB")
    lines.append("  recompute (GEMM FLOP/s over the whole recompute), at each measured row count M (-: not measured):")
    curves = {f"X {name}": profile.recompute_curve(name) for name in ("none", *profile.x_codec_gemm)}
    lines += _curve_rows(curves, "FLOP/s", lambda rows: f"M={rows:6.0f}")
    if profile.kv_decode:
        lines.append("  K,V codec decode (bytes decoded per second), at each measured stored size (-: not measured):")
        lines += _curve_rows(dict(profile.kv_decode), "B/s", lambda size: f"{size / 2**20:8g} MiB")
    if profile.host_layer_s:
        issue = [(name, profile.host_issue(name)) for name in ("none", *profile.x_codec_gemm)]
        costs = ", ".join(f"X {name} {cost.layer_s * 1e3:.3f} + {cost.chunk_s * 1e3:.3f}/chunk" for name, cost in issue)
        lines.append(
            f"  host issue per layer, ms: {costs}; {profile.host_kv_chunk_s * 1e3:.3f} per K,V chunk beyond one"
        )
    else:
        lines.append("  host issue per layer: not measured (on a CPU the host is the device)")
    return "\n".join(lines)


def _curve_rows(curves: dict[str, RateCurve], unit: str, label: Any) -> list[str]:
    """One row per size any curve measured; a curve without a point at that size shows '-'."""
    sizes = sorted({size for curve in curves.values() for size in curve.sizes})
    rows = []
    for size in sizes:
        cells = [
            f"{name} {format_rate(dict(curve.points)[size], unit) if size in curve.sizes else '-':>13}"
            for name, curve in curves.items()
        ]
        rows.append(f"    {label(size)}: " + ", ".join(cells))
    return rows


def run_plan(args: argparse.Namespace) -> int:
    """The split the scheduler picks per context length, with the predicted time of each alternative."""
    import torch

    from kvpr.cache.codec import make_x_codec
    from kvpr.cache.storage import tier_codec
    from kvpr.device import resolve_device, resolve_dtype
    from kvpr.scheduler.plan import format_plans
    from kvpr.scheduler.policy import planning_profile, stored_element_bytes
    from kvpr.scheduler.profile import HardwareProfile
    from kvpr.scheduler.profiler import load_or_measure

    if args.mode == "throughput":
        return _plan_throughput(args)
    cfg = model_config(args.model)
    if args.profile is not None:
        profile = HardwareProfile.load(args.profile)
        dtype = resolve_dtype(profile.dtype, torch.device("cpu"))  # the dtype it was measured in
    else:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        profile = load_or_measure(device, cfg, dtype, args.batch_size, progress=True)
    codec = tier_codec(args.kv_codec, cfg.head_dim)
    x_codec = make_x_codec(args.x_codec, cfg.hidden_size)
    if args.profile is None:  # planned here as the runtime plans here: graphed steps pay no host issue
        profile = planning_profile(profile, RuntimeConfig(), device, dtype, codec, x_codec)
    x_bytes, kv_bytes = stored_element_bytes(cfg, dtype, codec, x_codec)
    chunks = parse_num_chunks(args.num_chunks)
    kv_name = "none" if codec is None else codec.name
    plans = format_plans(
        cfg, args.batch_size, args.context, profile, kv_bytes, x_bytes, chunks, args.x_codec, kv_name, args.gpu_resident
    )
    print(plans)
    return 0


def _plan_throughput(args: argparse.Namespace) -> int:
    """kvpr's throughput policy for this machine beside FlexGen's (the same search without recomputation)."""
    from kvpr.placement import plan_throughput
    from kvpr.scheduler.throughput_policy import format_plans

    config = EngineConfig(
        model=args.model,
        dummy_weights=True,
        runtime=RuntimeConfig(
            device=args.device, dtype=args.dtype, profile_path=args.profile, host_memory_gib=args.host_memory_gib
        ),
        throughput=ThroughputConfig(offload_dir=args.offload_dir),
    )
    plans = [
        (name, plan_throughput(config, args.prompt_len, args.gen_len, recompute, args.gpu_memory_gib))
        for name, recompute in (("kvpr", True), ("flexgen", False))
    ]
    print(format_plans(plans))
    return 0
