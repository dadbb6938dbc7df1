"""Tiered attention on one GPU: the cache split between GPU and host by a GPU memory budget.

For each workload, kvpr with the whole cache on the GPU (``kvpr-gpu``, ``--offload none``), then
``--offload auto`` under a ``--gpu-memory-gib`` budget chosen so that a share ``gpu_fraction`` of the
batch's tokens stays on the GPU (``kvpr-tiered``: the solver's split of the overflow;
``kvpr-off-tiered``: the same placement, every overflow token's K,V copied). Every timed figure is
the median of ``--repeats`` runs with its range, and each row carries the floor of its own plan
(benchmarks/floors.py: the overflow's PCIe bytes at the best bandwidth measured, or the device's
reads of weights and every cached token plus the recompute, whichever is larger). Also reported:
the device bytes of the offloaded executor's chunk rings against the two ``s_max`` staging buffers
of the layout they replaced, and the largest opt-6.7b batch at 2016 tokens that each admits under
``--gpu-memory-gib 24``. Writes ``tiered-<device>-<yyyymmdd>.{json,md,png}`` into ``--out``.

    python benchmarks/bench_tiered.py --suite tiered --out benchmarks/results
    python benchmarks/bench_tiered.py --suite cpu-tiny --device cpu --repeats 1 --allow-dirty --out /tmp/t
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floors import (  # noqa: E402
    decode_weight_bytes,
    floor_with_demonstrated_h2d,
    resident_work,
    token_bytes,
    tokenwise_work,
)
from latency_systems import SYSTEMS, free_memory, recompute_fraction, run_kvpr, warm_kvpr  # noqa: E402
from provenance import add_provenance_args, header_or_exit  # noqa: E402
from spread import aggregate  # noqa: E402

from bench_latency import TIMED, Case, _floor, _prompts  # noqa: E402
from kvpr.api import LLM  # noqa: E402
from kvpr.cache.storage import CacheShape  # noqa: E402
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig  # noqa: E402
from kvpr.device import element_size  # noqa: E402
from kvpr.models.loader import build_model  # noqa: E402
from kvpr.models.registry import builtin_config  # noqa: E402
from kvpr.placement import DEVICE_FILL, GIB, Target, cache_bytes, usable_bytes_for_tokens  # noqa: E402
from kvpr.scheduler.profile import profile_shape  # noqa: E402
from kvpr.scheduler.profiler import load_or_measure  # noqa: E402

FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.0)
SUITES: dict[str, list[tuple[Case, tuple[float, ...]]]] = {
    # (workload, GPU fractions): everything fits, and the sweep
    "tiered": [
        (Case("opt-6.7b", 32, 256, 32), (1.0,)),
        (Case("opt-6.7b", 16, 2016, 16), FRACTIONS),
        (Case("llama-3-8b", 8, 8184, 8), FRACTIONS),
    ],
    "sweep-opt": [(Case("opt-6.7b", 16, 2016, 16), FRACTIONS)],
    # the host-bound point of the sweep alone (issue 13's 1.10x target), when device time is short
    "share-075": [(Case("opt-6.7b", 16, 2016, 16), (0.75,))],
    "sweep-llama": [(Case("llama-3-8b", 8, 8184, 8), FRACTIONS)],
    "offloaded-opt": [(Case("opt-6.7b", 16, 2016, 16), (0.0,))],  # the sweep's last point alone
    "cpu-tiny": [(Case("opt-125m", 2, 48, 6), (1.0, 0.5, 0.0))],  # the script itself, in seconds on a CPU
}


def budget_for_tokens(llm: LLM, case: Case, tokens: int) -> float:
    """The ``--gpu-memory-gib`` under which ``--offload auto`` keeps ``tokens`` of the batch's tokens'
    K,V on the GPU: ``kvpr.placement.gpu_token_capacity`` solved for its budget (what kvpr holds
    now, the weights, plus the tier, the rings and the workspace reserve it keeps)."""
    shape = CacheShape.for_model(llm.model_config, case.batch_size, case.prompt_len + case.gen_len, llm.dtype)
    usable = usable_bytes_for_tokens(shape, tokens)  # usable = FILL * (budget - held)
    held = torch.cuda.memory_allocated(llm.device) if llm.device.type == "cuda" else 0
    return (usable / DEVICE_FILL + held) / GIB


def placed(llm: LLM, case: Case, fraction: float | None, recompute: str) -> tuple[LLM, float | None]:
    """kvpr-gpu (``fraction`` None) or ``--offload auto`` under the budget for ``fraction``."""
    if fraction is None:
        return llm.with_placement(CacheConfig(offload=Offload.NONE)), None
    max_len = case.prompt_len + case.gen_len
    gib = budget_for_tokens(llm, case, round(fraction * max_len)) if fraction < 1.0 else 1e6
    cache = CacheConfig(offload=Offload.AUTO, recompute=recompute, gpu_resident="auto")
    runtime = dataclasses.replace(llm.config.runtime, gpu_memory_gib=gib)
    if llm.device.type != "cuda":  # no device memory to budget: the same tiers by token count
        tokens = max_len if fraction >= 1.0 else round(fraction * max_len)
        cache = dataclasses.replace(cache, offload=Offload.CPU, gpu_resident=tokens)
    return llm.with_placement(cache, runtime), gib


def timed(llm: LLM, case: Case, fraction: float | None, recompute: str, repeats: int, profile, weights) -> dict:
    """Warm-up, ``repeats`` runs, medians, the placement each run had, the floor of its own plan."""
    engine, gib = placed(llm, case, fraction, recompute)
    prompts = _prompts(case, llm.model_config.vocab_size)
    max_len = case.prompt_len + case.gen_len
    executor = engine.make_executor(case.batch_size, max_len)  # the plan, as every run makes it
    gpu_slots = executor.plan.gpu_slots if executor.offloaded else max_len
    staging = getattr(executor, "staging_bytes", 0)
    del executor
    free_memory()
    warm_kvpr(engine, SYSTEMS["kvpr-auto"], prompts)
    runs = []
    for _ in range(repeats):
        runs.append(run_kvpr(engine, case, prompts))
        free_memory()
    row = aggregate(runs, TIMED)
    contexts = [case.prompt_len + step for step in range(len(row["host_lens"]))]
    row.update(
        gpu_memory_gib=gib,
        gpu_slots=gpu_slots,  # the GPU tier: prefix and tail
        # the share of the cached tokens on the GPU, mean over the decode steps
        gpu_share=1.0 - sum(h / s for h, s in zip(row["host_lens"], contexts)) / max(1, len(contexts)),
        staging_bytes=staging,
        recompute_fraction=recompute_fraction(row["recompute_lens"], row["host_lens"]),
    )
    cfg = llm.model_config
    if row["host_lens"] and max(row["host_lens"]) > 0:
        tokens = token_bytes(cfg, case.batch_size, llm.dtype, weights)
        splits = [(r["recompute_lens"], r["host_lens"]) for r in runs]
        work = lambda: [tokenwise_work(tokens, case.prompt_len, lens, host) for lens, host in splits]  # noqa: E731
        _floor(row, work, profile, SYSTEMS["kvpr-auto"])
    else:
        fp16 = token_bytes(cfg, case.batch_size, llm.dtype, weights)
        _floor(row, lambda: [resident_work(fp16, case.prompt_len, case.gen_len - 1)], profile, SYSTEMS["hf-gpu"])
    return row


def largest_batch(model: str, prompt_len: int, gen_len: int, gib: float, old_layout: bool) -> int:
    """The largest fp16 batch whose whole cache offloaded (recompute on) leaves its GPU bytes within
    ``gib`` beside the weights: today's GPU tail and chunk rings (``placement.cache_bytes``, what the
    memory check counts), or (``old_layout``) the two staging buffers of ``s_max`` tokens' K,V and
    X that the layout before tiered attention kept. Arithmetic of the memory check (no GPU needed);
    host memory is not the question here."""
    cfg, max_len, dtype = builtin_config(model), prompt_len + gen_len, torch.float16
    weights = sum(p.numel() for p in build_model(cfg).parameters()) * element_size(dtype)
    allowed = DEVICE_FILL * gib * GIB - weights
    cache = CacheConfig(offload=Offload.CPU, recompute=0.5)
    target = Target(cfg, model, torch.device("cpu"), dtype, cache, None, None, None, gib)

    def device_bytes(batch: int) -> int:
        shape = CacheShape.for_model(cfg, batch, max_len, dtype)
        if old_layout:
            return 2 * (shape.kv_bytes() + shape.x_bytes()) // cfg.num_layers
        return cache_bytes(target, shape)[0]

    low, high = 0, 1
    while device_bytes(high) <= allowed and high < 1 << 16:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if device_bytes(middle) <= allowed else (low, middle)
    return low


def capacity(gib: float) -> dict[str, Any]:
    """The largest opt-6.7b batch of 2016 + 16 tokens, whole cache offloaded, under ``gib``."""
    return {
        "gpu_memory_gib": gib,
        "chunk_rings": largest_batch("opt-6.7b", 2016, 16, gib, old_layout=False),
        "s_max_staging": largest_batch("opt-6.7b", 2016, 16, gib, old_layout=True),
    }


def systems_for(fractions: tuple[float, ...]) -> list[tuple[str, float | None, str]]:
    """(system, GPU fraction or None for kvpr-gpu, --recompute) of one workload."""
    systems: list[tuple[str, float | None, str]] = [("kvpr-gpu", None, "auto")]
    for fraction in fractions:
        systems.append(("kvpr-tiered", fraction, "auto"))
        if fraction < 1.0:
            systems.append(("kvpr-off-tiered", fraction, "off"))
    return systems


def add_ratios(rows: list[dict[str, Any]]) -> None:
    key = lambda r: (r["model"], r["batch_size"], r["prompt_len"])  # noqa: E731
    gpu = {key(r): r for r in rows if r["system"] == "kvpr-gpu" and r.get("decode_ms_per_token")}
    for row in rows:
        if not row.get("decode_ms_per_token"):
            continue
        if key(row) in gpu and row["system"] != "kvpr-gpu":
            row["vs_kvpr_gpu"] = row["decode_ms_per_token"] / gpu[key(row)]["decode_ms_per_token"]
        if row.get("floor_ms"):
            row["vs_floor"] = row["decode_ms_per_token"] / row["floor_ms"]


def markdown(rows: list[dict[str, Any]]) -> str:
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        "| model | b | prompt | gen | system | GPU fraction (measured) | decode ms/token [min-max] | floor ms "
        "| x floor | x kvpr-gpu | l/h | ring MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['prompt_len']} | {r['gen_len']} | {r['system']} "
                         f"| {r['gpu_fraction']} | skipped: {r['skipped']} | | | | | |")  # fmt: skip
            continue
        decode = (
            f"{r['decode_ms_per_token']:.1f} [{r['decode_ms_per_token_min']:.1f}-{r['decode_ms_per_token_max']:.1f}]"
        )
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['prompt_len']} | {r['gen_len']} | {r['system']} | "
            f"{r['gpu_fraction']:.2f} ({r['gpu_share']:.2f}) | {decode} | {fmt(r.get('floor_ms'), '.1f')} | "
            f"{fmt(r.get('vs_floor'), '.2f')} | {fmt(r.get('vs_kvpr_gpu'), '.2f')} | "
            f"{fmt(r.get('recompute_fraction'), '.2f')} | {r['staging_bytes'] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """ms/token against the GPU fraction per workload: kvpr-tiered, kvpr-off-tiered and the floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["model"], r["batch_size"], r["prompt_len"]) for r in rows if r["system"] != "kvpr-gpu"})
    cases = [c for c in cases if sum(1 for r in rows if (r["model"], r["batch_size"], r["prompt_len"]) == c) > 2]
    if not cases:
        return
    fig, axes = plt.subplots(1, len(cases), figsize=(5.5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        mine = [
            r for r in rows if (r["model"], r["batch_size"], r["prompt_len"]) == case and r.get("decode_ms_per_token")
        ]
        for system, style in (("kvpr-tiered", "o-"), ("kvpr-off-tiered", "s--")):
            points = sorted(((r["gpu_fraction"], r) for r in mine if r["system"] == system), key=lambda p: p[0])
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [r["decode_ms_per_token"] for _, r in points]
            err = [[y - r["decode_ms_per_token_min"] for y, (_, r) in zip(ys, points)],
                   [r["decode_ms_per_token_max"] - y for y, (_, r) in zip(ys, points)]]  # fmt: skip
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=system)
            if system == "kvpr-tiered":
                floors = [(x, r["floor_ms"]) for x, r in points if r.get("floor_ms")]
                ax.plot([x for x, _ in floors], [f for _, f in floors], "k:", label="floor of kvpr-tiered's plan")
        gpu = [r for r in mine if r["system"] == "kvpr-gpu"]
        if gpu:
            ax.axhline(gpu[0]["decode_ms_per_token"], color="grey", lw=0.8, label="kvpr-gpu (all on the GPU)")
        ax.set_xlabel("share of the cache's tokens on the GPU")
        ax.set_ylabel("decode ms / token (median, min-max)")
        ax.set_title(f"{case[0]} b={case[1]} prompt={case[2]}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", default=["tiered"], choices=list(SUITES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda", help="cuda (fp16), or cpu (fp32) to try the script itself")
    parser.add_argument("--budget-gib", type=float, default=24.0, help="the GPU budget of the largest-batch figure")
    parser.add_argument("--capacity-only", action="store_true", help="only the largest-batch figure (no GPU needed)")
    parser.add_argument("--render", type=Path, default=None, help="table and plot of a results JSON (a cut-short run)")
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.render is not None:  # the run's own rows, ratios added, beside its JSON
        rows = json.loads(args.render.read_text())["rows"]
        add_ratios(rows)
        args.render.with_suffix(".md").write_text(markdown(rows) + "\n")
        plot(rows, args.render.with_suffix(".png"))
        print(markdown(rows))
        return
    header = header_or_exit(args.allow_dirty)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"tiered-{header['device'].replace(' ', '_')}-{header['date']}"
    if args.capacity_only:
        result = {**header, "largest_batch_opt_6_7b_2016": capacity(args.budget_gib)}
        (out / f"tiered-capacity-{header['device'].replace(' ', '_')}-{header['date']}.json").write_text(
            json.dumps(result, indent=1)
        )
        print(json.dumps(result["largest_batch_opt_6_7b_2016"]))
        return
    jobs = [job for suite in args.suite for job in SUITES[suite]]
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def write() -> None:
        floor_with_demonstrated_h2d(rows)  # a ring copy may beat the profiler's best: floors from the better rate
        (out / f"{stem}.json").write_text(
            json.dumps({**header, "repeats": args.repeats, **extra, "rows": rows}, indent=1)
        )

    progress = tqdm(total=sum(len(systems_for(fractions)) for _, fractions in jobs), desc="tiered bench")
    llm, profile, weights = None, None, 0.0
    for case, fractions in jobs:
        if llm is None or llm.name != case.model:
            del llm
            free_memory()
            # a CPU run is tiny: a short flush block, so that a GPU prefix exists at all
            runtime = RuntimeConfig(device=args.device, dtype="auto", flush_block=64 if args.device == "cuda" else 8)
            llm = LLM(EngineConfig(model=case.model, dummy_weights=True, runtime=runtime))
            profile = load_or_measure(llm.device, llm.model_config, llm.dtype, case.batch_size, progress=True)
            profile.save(
                out / f"profile-{profile_shape(llm.model_config, llm.dtype)}-b{profile.batch_size}-tiered.json"
            )
            weights = decode_weight_bytes(llm.model, element_size(llm.dtype))
        for name, fraction, recompute in systems_for(fractions):
            progress.set_postfix_str(f"{case.model} b={case.batch_size} s={case.prompt_len} {name} {fraction}")
            requested = 1.0 if fraction is None else fraction
            row: dict[str, Any] = {**dataclasses.asdict(case), "system": name, "gpu_fraction": requested}
            try:
                row.update(timed(llm, case, fraction, recompute, args.repeats, profile, weights))
            except Exception as err:  # a failing point is a result to report, not the end of the run
                row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            free_memory()
            rows.append(row)
            write()
            tqdm.write(json.dumps({k: v for k, v in row.items() if not k.endswith(("_runs", "_lens"))}))
            progress.update()
    progress.close()
    extra["largest_batch_opt_6_7b_2016"] = capacity(args.budget_gib)
    add_ratios(rows)
    write()
    table = markdown(rows)
    (out / f"{stem}.md").write_text(table + "\n")
    plot(rows, out / f"{stem}.png")
    print(table)
    if extra:
        print(json.dumps(extra))


if __name__ == "__main__":
    main()
