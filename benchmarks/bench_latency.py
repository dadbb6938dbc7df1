"""Latency mode side by side: transformers (KV on GPU, offloaded cache), kvpr's placements, the floor.

One process, one GPU, the same seeded prompts and the same weights for every system (transformers'
model is built around kvpr's tensors, whose names match the checkpoint). Every timed figure is the
median of ``--repeats`` independent runs (a fresh cache and executor each, allocator state freed
between), with its min, max and raw values; each timed row carries the floor of its own plan
(``floors.py``). Writes ``<tag>-<device>-<yyyymmdd>.json`` (provenance header, rows), a markdown
table, a PNG chart and the profile the floors came from into ``--out``, after every row.

    python benchmarks/bench_latency.py --suite paper long-opt --out benchmarks/results
    python benchmarks/bench_latency.py --run paper:kvpr-off,kvpr-auto,floor llama-2048:kvpr-off,kvpr-x4
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floors import (  # noqa: E402
    FloorKind,
    FloorRates,
    FloorUnavailable,
    StepWork,
    copy_all_work,
    counted_work,
    decode_weight_bytes,
    floor_fields,
    floor_ms,
    floor_with_demonstrated_h2d,
    resident_work,
    token_bytes,
    tokenwise_work,
)
from latency_systems import (  # noqa: E402
    DEFAULT_SYSTEMS,
    SKIPPED_STEPS,
    System,
    free_memory,
    hf_model,
    kv_fits_on_gpu,
    method_profile,
    placed_llm,
    recompute_fraction,
    run_hf,
    run_kvpr,
    system_named,
    warm_hf,
    warm_kvpr,
)
from provenance import add_provenance_args, header_or_exit  # noqa: E402
from spread import aggregate  # noqa: E402

from kvpr.api import LLM  # noqa: E402
from kvpr.config import EngineConfig, RuntimeConfig  # noqa: E402
from kvpr.device import element_size  # noqa: E402
from kvpr.scheduler.cost_model import Schedule  # noqa: E402
from kvpr.scheduler.plan import plan_decode_step  # noqa: E402
from kvpr.scheduler.policy import planning_profile  # noqa: E402
from kvpr.scheduler.profile import HardwareProfile, profile_shape  # noqa: E402
from kvpr.scheduler.profiler import load_or_measure  # noqa: E402

TIMED = ("decode_ms_per_token", "prefill_s", "total_s")  # medians with min, max and runs


@dataclass(frozen=True)
class Case:
    model: str
    batch_size: int
    prompt_len: int
    gen_len: int


SUITES: dict[str, list[Case]] = {
    "smoke": [Case("opt-1.3b", 8, 256, 8)],
    "cpu-tiny": [Case("opt-125m", 2, 32, 4)],  # every code path in seconds on a CPU (--device cpu)
    "paper": [Case("opt-6.7b", 32, 256, 32)],
    # OPT has 2048 learned positions: its "2048" workloads use prompt 2016 + 16 new tokens.
    "long-opt": [Case("opt-6.7b", 16, 2016, 16), Case("opt-6.7b", 32, 2016, 16)],
    "long16": [Case("opt-6.7b", 16, 2016, 16)],
    # transformers' offloaded cache was killed for host memory here on the 128 GB H100 host:
    # run it with --systems hf-gpu kvpr-off kvpr-auto floor.
    "llama-long": [Case("llama-3-8b", 16, 2048, 16), Case("llama-3-8b", 8, 8184, 8)],
    "llama-2048": [Case("llama-3-8b", 16, 2048, 16)],
    "b64": [Case("opt-6.7b", 64, 1024, 16)],
    # KVO composed with offload (issue 5's target: kvpr-kvo at least 3x faster than kvpr-off here)
    "kvo": [Case("opt-6.7b", 16, 2016, 16)],
    # issue 14 item 3: GQA models at 8K, 16K and 32K, the cache offloaded, 64K tokens a batch
    # (llama-3.1-8b: Llama 3's shapes with 128K positions); run with kvpr-off,kvpr-kivi4,kvpr-kvo-compile
    "gqa-long": [
        Case(model, batch, context - 8, 8)
        for model in ("llama-3.1-8b", "mistral-7b", "qwen2-7b")
        for batch, context in ((8, 8192), (4, 16384), (2, 32768))
    ],
    # issue 14's speed targets: llama-3-8b 8 x 8K and 4 x 32K (3.1: 128K positions), offloaded vs --offload none
    "gqa-targets": [Case("llama-3-8b", 8, 8184, 8), Case("llama-3.1-8b", 4, 32760, 8)],
    "gqa-8k": [Case("llama-3-8b", 8, 8184, 8)],
    "gqa-32k": [Case("llama-3.1-8b", 4, 32760, 8)],
    "long-other": [
        Case("llama-3-8b", 16, 2048, 16),
        Case("llama-3-8b", 8, 8184, 8),
        Case("opt-13b", 16, 2016, 16),
        Case("opt-13b", 32, 256, 32),
    ],
}
Job = tuple[Case, tuple[str, ...]]  # a workload and the systems to run on it


def _prompts(case: Case, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(10, vocab - 10, (case.batch_size, case.prompt_len), generator=generator)


def _floor(
    row: dict[str, Any], candidates: Callable[[], list[list[StepWork]]], profile: HardwareProfile, system: System
) -> None:
    """Add the row's floor fields: the lowest floor of the candidate runs' steps (the split may differ
    between runs); or say why there is none (a profile without the rates)."""
    try:
        rates = FloorRates.from_profile(profile, system.x_codec)
        timed = [steps[SKIPPED_STEPS:] or steps for steps in candidates()]  # the steps decode ms/token counts
        best = min(timed, key=lambda steps: floor_ms(steps, rates))
        row.update(floor_fields(system.floor_kind, best, rates))
    except FloorUnavailable as missing:
        row.update(floor_ms=None, floor_kind=system.floor_kind.value, floor_missing=str(missing))


def predicted_floor_row(llm: LLM, case: Case, profile: HardwareProfile, weights: float) -> dict[str, Any]:
    """Not timed: the fp16 split the cost model plans for kvpr-auto, its predicted step time and chunk
    counts, and the floor of that plan (the same formula as the timed rows')."""
    cfg, element = llm.model_config, element_size(llm.dtype)
    num_chunks = llm.config.runtime.num_chunks
    planned = planning_profile(profile, llm.config.runtime, llm.device, llm.dtype, None, None)  # as kvpr-auto plans
    plans = [
        plan_decode_step(
            cfg, case.batch_size, case.prompt_len + step, planned, element, element, Schedule.CHUNKED, num_chunks
        )
        for step in range(case.gen_len - 1)
    ]
    row: dict[str, Any] = {
        "timed": False,
        "prefill_s": None,
        "predicted_auto_ms_per_token": 1e3 * cfg.num_layers * sum(p.predicted_s for p in plans) / len(plans),
        "auto_num_chunks": sorted({plan.num_chunks for plan in plans}),
    }
    tokens = token_bytes(cfg, case.batch_size, llm.dtype, weights)
    lens = [plan.recompute_len for plan in plans]
    _floor(row, lambda: [tokenwise_work(tokens, case.prompt_len, lens)], profile, system_named("floor"))
    row["decode_ms_per_token"] = row["floor_ms"]  # the chart's bar
    return row


def timed_row(
    llm: LLM, hf: Any, case: Case, system: System, repeats: int, profile: HardwareProfile, weights: float
) -> dict[str, Any]:
    """Warm up at the timed shape, then ``repeats`` runs, each with fresh state; medians and floor."""
    prompts = _prompts(case, llm.model_config.vocab_size)
    cfg, num_steps = llm.model_config, case.gen_len - 1
    if system.runner == "hf":
        extra = warm_hf(hf, system, prompts)
        runs = []
        for _ in range(repeats):
            runs.append(run_hf(hf, system, case, prompts))
            free_memory()
        row = {**aggregate(runs, TIMED), **extra}
        fp16 = token_bytes(cfg, case.batch_size, llm.dtype, weights)
        work = resident_work if system.floor_kind is FloorKind.GPU_RESIDENT else copy_all_work
        _floor(row, lambda: [work(fp16, case.prompt_len, num_steps)], profile, system)
        return row
    placed = placed_llm(llm, system)
    warm_kvpr(placed, system, prompts)
    runs = []
    for _ in range(repeats):
        runs.append(run_kvpr(placed, case, prompts))
        free_memory()
    row = aggregate(runs, TIMED)
    row["recompute_fraction"] = recompute_fraction(row["recompute_lens"], row["host_lens"])
    if any(run["recompute_lens"] != row["recompute_lens"] for run in runs):
        row["recompute_lens_runs"] = [run["recompute_lens"] for run in runs]
    if system.cache_method:
        counted = [(r["link_bytes_per_step"], r["read_bytes_per_step"]) for r in runs]
        _floor(row, lambda: [counted_work(link, read, weights, num_steps) for link, read in counted], profile, system)
    else:
        tokens = token_bytes(cfg, case.batch_size, llm.dtype, weights, system.kv_codec, system.x_codec)
        splits = [(r["recompute_lens"], r["host_lens"]) for r in runs]
        _floor(
            row, lambda: [tokenwise_work(tokens, case.prompt_len, lens, host) for lens, host in splits], profile, system
        )
    if system.kv_codec == "kvo":  # selection, gather and decoding in a step; host memory
        row.update(method_profile(llm, system, prompts, row["decode_ms_per_token"], profile.h2d_best()))
        free_memory()
    return row


def bench(
    jobs: list[Job],
    repeats: int,
    host_memory_gib: float | None = None,
    device: str = "cuda",
    checkpoint: Callable[[list[dict[str, Any]], dict[str, HardwareProfile]], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, HardwareProfile]]:
    """Run every job, grouped by model (one load and profile per model); ``checkpoint(rows, profiles)``
    after each row. A failing system is a row with ``skipped``, not the end of the run."""
    rows: list[dict[str, Any]] = []
    profiles: dict[str, HardwareProfile] = {}
    by_model: dict[str, list[Job]] = {}
    for job in jobs:
        by_model.setdefault(job[0].model, []).append(job)
    progress = tqdm(total=sum(len(systems) for _, systems in jobs), desc="latency bench")
    for model, model_jobs in by_model.items():
        runtime = RuntimeConfig(device=device, dtype="auto", host_memory_gib=host_memory_gib)  # fp16 on a GPU
        llm = LLM(EngineConfig(model=model, dummy_weights=True, runtime=runtime))
        needs_hf = any(name.startswith("hf") for _, systems in model_jobs for name in systems)
        hf = hf_model(llm, model) if needs_hf else None
        batch = model_jobs[0][0].batch_size
        profile = load_or_measure(llm.device, llm.model_config, llm.dtype, batch, progress=True)
        profiles[f"{profile_shape(llm.model_config, llm.dtype)}-b{profile.batch_size}"] = profile
        weights = decode_weight_bytes(llm.model, element_size(llm.dtype))
        for case, systems in model_jobs:
            for name in systems:
                progress.set_postfix_str(f"{model} b={case.batch_size} s={case.prompt_len} {name}")
                row: dict[str, Any] = {**asdict(case), "system": name}
                try:
                    system = system_named(name)
                    if system.runner == "floor":
                        row.update(predicted_floor_row(llm, case, profile, weights))
                    elif name == "hf-gpu" and not kv_fits_on_gpu(llm, case):
                        row["skipped"] = "KV cache does not fit on the GPU"
                    else:
                        row.update(timed_row(llm, hf, case, system, repeats, profile, weights))
                except Exception as err:  # a failing system is a result to report, not the end of the run
                    row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                free_memory()
                if row.get("decode_ms_per_token"):
                    row["tokens_per_s"] = case.batch_size * 1e3 / row["decode_ms_per_token"]
                rows.append(row)
                if checkpoint is not None:
                    checkpoint(rows, profiles)
                tqdm.write(json.dumps({k: v for k, v in row.items() if not k.endswith(("_runs", "recompute_lens"))}))
                progress.update()
        del llm, hf
        free_memory()
    progress.close()
    return rows, profiles


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """kvpr-auto relative to each other system of the same case (> 1 means kvpr-auto is faster), each
    system relative to kvpr-off, the full K,V transfer (> 1 means the system is faster), and each
    timed row relative to its own floor (>= 1 unless the floor is wrong); all on medians."""
    key = lambda r: (r["model"], r["batch_size"], r["prompt_len"], r["gen_len"])  # noqa: E731
    timed = [r for r in rows if r.get("decode_ms_per_token")]
    auto = {key(r): r for r in timed if r["system"] == "kvpr-auto"}
    off = {key(r): r for r in timed if r["system"] == "kvpr-off"}
    for row in timed:
        mine, full = auto.get(key(row)), off.get(key(row))
        if mine and row["system"] != "kvpr-auto":
            row["kvpr_auto_speedup"] = row["decode_ms_per_token"] / mine["decode_ms_per_token"]
        if full and row["system"] != "kvpr-off":
            row["speedup_vs_kvpr_off"] = full["decode_ms_per_token"] / row["decode_ms_per_token"]
        if row.get("timed", True) and row.get("floor_ms"):
            row["vs_floor"] = row["decode_ms_per_token"] / row["floor_ms"]


def markdown(rows: list[dict[str, Any]]) -> str:
    """Medians with [min-max] over the repeats; the floor of each row's own plan and the ratio to it."""
    lines = [
        "| model | b | prompt | gen | system | decode ms/token | prefill s | total s | floor ms | x floor "
        "| tokens/s | l/s | kvpr-auto speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731

    def ranged(r: dict[str, Any], key: str, f: str) -> str:
        if r.get(f"{key}_min") is None:
            return fmt(r.get(key), f)
        return f"{r[key]:{f}} [{r[f'{key}_min']:{f}}-{r[f'{key}_max']:{f}}]"

    for r in rows:
        decode = "skipped" if r.get("skipped") else ranged(r, "decode_ms_per_token", ".1f")
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['prompt_len']} | {r['gen_len']} | {r['system']} | {decode} | "
            f"{ranged(r, 'prefill_s', '.2f')} | {ranged(r, 'total_s', '.2f')} | {fmt(r.get('floor_ms'), '.1f')} | "
            f"{fmt(r.get('vs_floor'), '.2f')} | {fmt(r.get('tokens_per_s'), '.1f')} | "
            f"{fmt(r.get('recompute_fraction'), '.2f')} | {fmt(r.get('kvpr_auto_speedup'), '.2f')} |"
        )
    profiled = [r for r in rows if "method_device_share" in r]
    if profiled:  # cache methods: what a step moves and costs, and the host memory they take
        lines += [
            "",
            "| model | b | prompt | system | decode ms/token | vs kvpr-off | method kernels share | "
            "link MB/step | link ms/step | host cache / fp16 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in profiled:
            lines.append(
                f"| {r['model']} | {r['batch_size']} | {r['prompt_len']} | {r['system']} | "
                f"{r['decode_ms_per_token']:.1f} | {fmt(r.get('speedup_vs_kvpr_off'), '.2f')} | "
                f"{r['method_device_share']:.1%} | {r['floor_link_bytes_per_step'] / 1e6:.1f} | "
                f"{r['link_ms_per_step']:.2f} | {r['host_cache_share']:.1%} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Bars of the median decode time per case and system, whiskers from min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["model"], r["batch_size"], r["prompt_len"]) for r in rows})
    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cases)), 4))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        values, low, high = [], [], []
        for case in cases:
            match = [
                r for r in rows if (r["model"], r["batch_size"], r["prompt_len"]) == case and r["system"] == system
            ]
            value = (match[0].get("decode_ms_per_token") or 0.0) if match else 0.0
            values.append(value)
            low.append(value - ((match[0].get("decode_ms_per_token_min") or value) if match else value))
            high.append(((match[0].get("decode_ms_per_token_max") or value) if match else value) - value)
        xs = [c + index * width for c in range(len(cases))]
        ax.bar(xs, values, width, label=system, yerr=[low, high], capsize=2)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{m}\nb={b} s={p}" for m, b, p in cases], fontsize=8)
    ax.set_ylabel("decode ms / token, median of runs (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Latency mode, KV offloaded to host memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_jobs(suites: list[str], systems: list[str], runs: list[str]) -> list[Job]:
    """``--suite`` x ``--systems``, then each ``--run SUITE:SYS,SYS``; every system name checked first."""
    jobs: list[Job] = [(case, tuple(systems)) for suite in suites for case in SUITES[suite]]
    for spec in runs:
        suite, _, names = spec.partition(":")
        if suite not in SUITES or not names:
            raise SystemExit(f"--run {spec!r}: give SUITE:SYSTEM,SYSTEM with SUITE one of {', '.join(SUITES)}")
        jobs += [(case, tuple(names.split(","))) for case in SUITES[suite]]
    for _, names in jobs:
        for name in names:
            try:
                system_named(name)
            except ValueError as problem:
                raise SystemExit(str(problem)) from None
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="*", default=None, choices=list(SUITES))
    parser.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS))
    parser.add_argument("--run", nargs="*", default=[], help="SUITE:SYSTEM,SYSTEM,... (its own systems per suite)")
    parser.add_argument("--repeats", type=int, default=3, help="independent runs per timed figure (median, min, max)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="latency")
    parser.add_argument("--host-memory-gib", type=float, default=None, help="host memory budget (see kvpr --help)")
    parser.add_argument("--device", default="cuda", help="cuda (fp16), or cpu (fp32) to try the script itself")
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    suites = args.suite if args.suite is not None else ([] if args.run else ["paper", "long-opt", "long-other"])
    jobs = parse_jobs(suites, args.systems, args.run)
    header = header_or_exit(args.allow_dirty)  # before anything runs: a refused result costs nothing
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.tag}-{header['device'].replace(' ', '_')}-{header['date']}"

    def write(rows: list[dict[str, Any]], profiles: dict[str, HardwareProfile]) -> None:
        floor_with_demonstrated_h2d(rows)  # a ring copy may beat the profiler's best: floors from the better rate
        bandwidth = max((profile.h2d_best() for profile in profiles.values()), default=0.0)
        result = {**header, "repeats": args.repeats, "bandwidth_h2d_gbps": bandwidth / 1e9, "rows": rows}
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        for name, profile in profiles.items():  # the rates every floor and plan of this run came from
            profile.save(out / f"profile-{name}-{header['device'].replace(' ', '_')}-{header['date']}.json")

    rows, profiles = bench(jobs, args.repeats, args.host_memory_gib, args.device, checkpoint=write)
    add_ratios(rows)
    write(rows, profiles)
    table = markdown(rows)
    (out / f"{stem}.md").write_text(table + "\n")
    plot(rows, out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
