"""Latency mode side by side: transformers (KV on GPU, offloaded cache), kvpr (off, auto), the floor.

One run, one GPU, the same seeded prompts and the same weights for every system (transformers'
model is built around kvpr's tensors, whose names match the checkpoint). Writes
``latency-<device>-<yyyymmdd>.json``, a markdown table and a PNG chart into ``--out``.

    python benchmarks/bench_latency.py --suite paper long --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import sdpa_kernel
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpr.api import LLM  # noqa: E402
from kvpr.config import CacheConfig, EngineConfig, Offload, RuntimeConfig, SamplingParams  # noqa: E402
from kvpr.device import element_size  # noqa: E402
from kvpr.models.common import ATTENTION_BACKENDS  # noqa: E402
from kvpr.models.registry import BUILTIN_CONFIGS  # noqa: E402
from kvpr.scheduler.cost_model import Schedule  # noqa: E402
from kvpr.scheduler.plan import plan_decode_step  # noqa: E402
from kvpr.scheduler.profiler import load_or_measure  # noqa: E402


@dataclass(frozen=True)
class Case:
    model: str
    batch_size: int
    prompt_len: int
    gen_len: int


SUITES: dict[str, list[Case]] = {
    "smoke": [Case("opt-1.3b", 8, 256, 8)],
    "paper": [Case("opt-6.7b", 32, 256, 32)],
    # OPT has 2048 learned positions: its "2048" workloads use prompt 2016 + 16 new tokens.
    "long-opt": [
        Case("opt-6.7b", 16, 2016, 16),
        Case("opt-6.7b", 32, 2016, 16),
    ],
    # transformers' offloaded cache was killed for host memory here on the 128 GB H100 host:
    # run it with --systems hf-gpu kvpr-off kvpr-auto floor.
    "llama-long": [Case("llama-3-8b", 16, 2048, 16), Case("llama-3-8b", 8, 8184, 8)],
    "llama-2048": [Case("llama-3-8b", 16, 2048, 16)],
    "b64": [Case("opt-6.7b", 64, 1024, 16)],
    # KVO composed with offload (issue 5's target: kvpr-kvo at least 3x faster than kvpr-off here)
    "kvo": [Case("opt-6.7b", 16, 2016, 16)],
    "long-other": [
        Case("llama-3-8b", 16, 2048, 16),
        Case("llama-3-8b", 8, 8184, 8),
        Case("opt-13b", 16, 2016, 16),
        Case("opt-13b", 32, 256, 32),
    ],
}
SYSTEMS = ("hf-gpu", "hf-offloaded", "kvpr-off", "kvpr-auto", "floor")
# Also accepted by --systems: kvpr-int8, kvpr-int4 (compressed host tier), kvpr-x4, kvpr-int4-x4 (X
# stored in 4 bits, K,V in fp16 or int4), kvpr-kvo, kvpr-kivi2 (packed chunks in host memory, KVO
# reading only the selected ones), kvpr-kvo-compile (KVO decoding with torch.compile's kernels),
# kvpr-resident (auto split plus --gpu-resident auto), kvpr-F (fixed fraction F).
X_SYSTEMS = {"kvpr-x4": "none", "kvpr-int4-x4": "int4"}  # system -> --kv-codec, with --x-codec int4


def _sync() -> None:
    torch.cuda.synchronize()


def _free() -> None:
    """Give back device memory and the pinned host blocks torch's host allocator keeps cached."""
    gc.collect()
    torch.cuda.empty_cache()
    host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds only
    if host_empty_cache is not None:
        host_empty_cache()


def _prompts(case: Case, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(10, vocab - 10, (case.batch_size, case.prompt_len), generator=generator)


def run_kvpr(
    llm: LLM,
    case: Case,
    prompts: torch.Tensor,
    recompute: Any,
    codec: str = "none",
    resident: int | str = 0,
    x_codec: str = "none",
    compile: bool = False,
) -> dict[str, Any]:
    cache = CacheConfig(
        offload=Offload.CPU, recompute=recompute, kv_codec=codec, gpu_resident=resident, x_codec=x_codec
    )
    placed = llm.with_placement(cache, dataclasses.replace(llm.config.runtime, compile=compile))
    # Warm-up; with --compile at the batch and selection size of the run, so it compiles here.
    warm = prompts[:, :512] if compile else prompts[:1, :16]
    placed.generate(warm.tolist(), SamplingParams(max_new_tokens=2, stop_on_eos=False))
    placed.generate(prompts.tolist(), SamplingParams(max_new_tokens=case.gen_len, stop_on_eos=False))
    stats = placed.last_stats
    assert stats is not None
    contexts = [case.prompt_len + step for step in range(len(stats.recompute_lens))]  # s at each decode step
    fraction = sum(recomputed / s for recomputed, s in zip(stats.recompute_lens, contexts)) / max(1, len(contexts))
    decode_ms = 1e3 * sum(stats.step_s) / len(stats.step_s)
    return {
        "prefill_s": stats.prefill_s,
        "decode_ms_per_token": decode_ms,
        "recompute_fraction": fraction,
        "recompute_lens": stats.recompute_lens,
    }


def method_profile(
    llm: LLM, case: Case, prompts: torch.Tensor, codec: str, decode_ms: float, bandwidth: float, compile: bool
) -> dict[str, Any]:
    """What one decode step of a cache method costs besides its time, measured on ``steps`` steps.

    Per phase annotated with ``record_function("<codec>.<phase>")`` (KVO: select, fetch of the
    selected rows, decode, attend) its device and host time, and their device time as a share of the
    unprofiled step; the host time of its parts (``<codec>_<part>.<what>``: the selection's copy to
    the host, the host gathers, the zero-copy gathers); the bytes the step read and copied over the
    link, and that copy's time at ``bandwidth`` bytes/s; the host memory the cache allocated against
    an fp16 host cache of the same slots.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    runtime = dataclasses.replace(llm.config.runtime, compile=compile)
    placed = llm.with_placement(CacheConfig(offload=Offload.CPU, kv_codec=codec), runtime)
    ids, steps = prompts.to(llm.device), 4
    executor = placed.make_executor(ids.shape[0], ids.shape[1] + steps)
    executor.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            executor.decode(ids[:, step])
        executor.finish()
    device_ms: dict[str, float] = {}
    host_ms: dict[str, float] = {}
    part_ms: dict[str, float] = {}
    for event in prof.events():  # host-side annotations: their device time is that of the kernels they launched
        if event.device_type == DeviceType.CPU and event.name.startswith(f"{codec}."):
            device_ms[event.name] = device_ms.get(event.name, 0.0) + event.device_time_total / 1e3 / steps
            host_ms[event.name] = host_ms.get(event.name, 0.0) + event.cpu_time_total / 1e3 / steps
        elif event.device_type == DeviceType.CPU and event.name.startswith(f"{codec}_"):
            part_ms[event.name] = part_ms.get(event.name, 0.0) + event.cpu_time_total / 1e3 / steps
    read, link = executor.step_bytes()
    host = executor.host_nbytes()
    cfg = llm.model_config
    fp16_host = 2 * cfg.num_layers * case.batch_size * (ids.shape[1] + steps) * cfg.kv_size * 2
    return {
        "phase_device_ms": device_ms,
        "phase_host_ms": host_ms,
        "part_host_ms": part_ms,
        "method_device_share": sum(device_ms.values()) / decode_ms,
        "read_bytes_per_step": read,
        "link_bytes_per_step": link,
        "link_ms_per_step": 1e3 * link / bandwidth,
        "host_cache_bytes": host,
        "fp16_host_cache_bytes": fp16_host,
        "host_cache_share": host / fp16_host,
    }


def _hf_model(llm: LLM, name: str) -> torch.nn.Module:
    """transformers' model of the same architecture, wrapped around kvpr's weight tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**BUILTIN_CONFIGS[name])
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=llm.dtype)
    hf.load_state_dict(llm.model.state_dict(), strict=False, assign=True)
    backbone = getattr(hf, "model", None)
    if backbone is not None and hasattr(backbone, "rotary_emb"):  # buffers were made on meta
        backbone.rotary_emb = type(backbone.rotary_emb)(config=hf_config, device=llm.device)
    return hf.eval()


class _StepClock:
    """A logits processor that timestamps every generated token (after a device sync), so the
    peer's prefill and per-token decode times come from one generate call, like kvpr's."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        _sync()
        self.stamps.append(time.perf_counter())
        return scores


def run_hf(hf: torch.nn.Module, case: Case, prompts: torch.Tensor, offloaded: bool) -> dict[str, Any]:
    from transformers import LogitsProcessorList

    ids = prompts.to("cuda")
    mask = torch.ones_like(ids)
    extra = {"cache_implementation": "offloaded"} if offloaded else {}
    # The peer gets the same attention backends as kvpr: cuDNN's rebuilds a plan per context length
    # (milliseconds of CPU per call) and failed outright at b=16, s=2048 on torch 2.11.
    with torch.inference_mode(), sdpa_kernel(ATTENTION_BACKENDS):
        hf.generate(
            input_ids=ids[:1, :16],
            attention_mask=mask[:1, :16],
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )  # warm-up
        clock = _StepClock()
        _sync()
        start = time.perf_counter()
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=case.gen_len,
            min_new_tokens=case.gen_len,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
            **extra,
        )
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return {"prefill_s": clock.stamps[0] - start, "decode_ms_per_token": 1e3 * sum(steps) / len(steps)}


def floor_row(llm: LLM, case: Case, profile: Any) -> dict[str, Any]:
    """max(PCIe bytes / measured bandwidth, compute) per layer for the plan kvpr-auto uses, beside
    that plan's own predicted step time and its chunk counts (the cost model, to compare with the run)."""
    cfg = llm.model_config
    element = element_size(llm.dtype)
    plans = [
        plan_decode_step(
            cfg,
            case.batch_size,
            case.prompt_len + step + 1,
            profile,
            element,
            element,
            Schedule.CHUNKED,
            llm.config.runtime.num_chunks,
        )
        for step in range(case.gen_len - 1)
    ]
    per_step = lambda values: 1e3 * cfg.num_layers * sum(values) / len(values)  # noqa: E731
    return {
        "prefill_s": None,
        "decode_ms_per_token": per_step([plan.predicted_floor_s for plan in plans]),
        "predicted_auto_ms_per_token": per_step([plan.predicted_s for plan in plans]),
        "auto_num_chunks": sorted({plan.num_chunks for plan in plans}),
    }


def _kv_fits_on_gpu(llm: LLM, case: Case) -> bool:
    cfg = llm.model_config
    kv = 2 * cfg.num_layers * (case.prompt_len + case.gen_len) * case.batch_size * cfg.kv_size * 2
    free, _ = torch.cuda.mem_get_info()
    return kv * 1.3 + 4 * 2**30 < free


def bench(
    cases: list[Case],
    systems: tuple[str, ...],
    host_memory_gib: float | None = None,
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
) -> tuple[list[dict[str, Any]], float]:
    """Run every system on every case; ``checkpoint(rows)`` is called after each row."""
    rows: list[dict[str, Any]] = []
    bandwidth = 0.0
    by_model: dict[str, list[Case]] = {}
    for case in cases:
        by_model.setdefault(case.model, []).append(case)
    progress = tqdm(total=len(cases) * len(systems), desc="latency bench")
    for model, model_cases in by_model.items():
        runtime = RuntimeConfig(device="cuda", dtype="float16", host_memory_gib=host_memory_gib)
        config = EngineConfig(model=model, dummy_weights=True, runtime=runtime)
        llm = LLM(config)
        hf = _hf_model(llm, model) if any(s.startswith("hf") for s in systems) else None
        profile = load_or_measure(llm.device, llm.model_config, llm.dtype, model_cases[0].batch_size, progress=True)
        bandwidth = max(bandwidth, profile.h2d_bytes_per_s(256 * 2**20) / 1e9)
        for case in model_cases:
            prompts = _prompts(case, llm.model_config.vocab_size)
            for system in systems:
                progress.set_postfix_str(f"{model} b={case.batch_size} s={case.prompt_len} {system}")
                row: dict[str, Any] = {**asdict(case), "system": system}
                try:
                    if system == "hf-gpu":
                        if not _kv_fits_on_gpu(llm, case):
                            row["skipped"] = "KV cache does not fit on the GPU"
                        else:
                            row.update(run_hf(hf, case, prompts, offloaded=False))
                    elif system == "hf-offloaded":
                        row.update(run_hf(hf, case, prompts, offloaded=True))
                    elif system == "kvpr-off":
                        row.update(run_kvpr(llm, case, prompts, "off"))
                    elif system == "kvpr-auto":
                        row.update(run_kvpr(llm, case, prompts, "auto"))
                    elif system == "kvpr-resident":  # auto split + as many tokens on the GPU as fit
                        row.update(run_kvpr(llm, case, prompts, "auto", resident="auto"))
                    elif system in ("kvpr-int8", "kvpr-int4"):  # compressed host tier, split chosen by auto
                        row.update(run_kvpr(llm, case, prompts, "auto", system.removeprefix("kvpr-")))
                    elif system in X_SYSTEMS:  # X stored in 4 bits too (K,V fp16 or int4), split chosen by auto
                        row.update(run_kvpr(llm, case, prompts, "auto", X_SYSTEMS[system], x_codec="int4"))
                    elif system in ("kvpr-kvo", "kvpr-kvo-compile", "kvpr-kivi2"):  # a cache method, no recompute
                        compile = system.endswith("-compile")
                        codec = system.removeprefix("kvpr-").removesuffix("-compile")
                        row.update(run_kvpr(llm, case, prompts, "off", codec, compile=compile))
                        if codec == "kvo":  # selection, gather and decoding in a step; bytes and memory
                            speed, ms = profile.h2d_bytes_per_s(256 * 2**20), row["decode_ms_per_token"]
                            row.update(method_profile(llm, case, prompts, codec, ms, speed, compile))
                    elif system.startswith("kvpr-"):  # a fixed fraction, e.g. kvpr-0.5
                        row.update(run_kvpr(llm, case, prompts, float(system.removeprefix("kvpr-"))))
                    elif system == "floor":
                        row.update(floor_row(llm, case, profile))
                except Exception as err:  # a failing system is a result to report, not the end of the run
                    row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                _free()
                if row.get("decode_ms_per_token"):
                    row["tokens_per_s"] = case.batch_size * 1e3 / row["decode_ms_per_token"]
                rows.append(row)
                if checkpoint is not None:
                    checkpoint(rows)
                tqdm.write(json.dumps({k: v for k, v in row.items() if k != "recompute_lens"}))
                progress.update()
        del llm, hf
        _free()
    progress.close()
    return rows, bandwidth


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """kvpr-auto relative to each other system of the same case (> 1 means kvpr-auto is faster), and
    each system relative to kvpr-off, the full K,V transfer (> 1 means the system is faster)."""
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


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | b | prompt | gen | system | decode ms/token | prefill s | tokens/s | l/s | kvpr-auto speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['prompt_len']} | {r['gen_len']} | {r['system']} | "
            f"{fmt(r.get('decode_ms_per_token'), '.1f') if not r.get('skipped') else 'skipped'} | "
            f"{fmt(r.get('prefill_s'), '.2f')} | {fmt(r.get('tokens_per_s'), '.1f')} | "
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
                f"{r['method_device_share']:.1%} | {r['link_bytes_per_step'] / 1e6:.1f} | "
                f"{r['link_ms_per_step']:.2f} | {r['host_cache_share']:.1%} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({(r["model"], r["batch_size"], r["prompt_len"]) for r in rows})
    systems = [s for s in dict.fromkeys(r["system"] for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(cases)), 4))
    width = 0.8 / len(systems)
    for index, system in enumerate(systems):
        values = []
        for case in cases:
            match = [
                r for r in rows if (r["model"], r["batch_size"], r["prompt_len"]) == case and r["system"] == system
            ]
            values.append(match[0].get("decode_ms_per_token") or 0.0 if match else 0.0)
        ax.bar([c + index * width for c in range(len(cases))], values, width, label=system)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{m}\nb={b} s={p}" for m, b, p in cases], fontsize=8)
    ax.set_ylabel("decode ms / token (lower is better)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Latency mode, KV offloaded to host memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", default=["paper", "long-opt", "long-other"], choices=list(SUITES))
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="latency")
    parser.add_argument("--host-memory-gib", type=float, default=None, help="host memory budget (see kvpr --help)")
    parser.add_argument("--commit", default=None, help="commit measured (default: git HEAD; pass it on the device)")
    args = parser.parse_args()
    cases = [case for suite in args.suite for case in SUITES[suite]]
    device = torch.cuda.get_device_name()
    date = datetime.date.today().strftime("%Y%m%d")
    commit = (
        args.commit
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.tag}-{device.replace(' ', '_')}-{date}"

    def write(rows: list[dict[str, Any]], bandwidth: float = 0.0) -> None:
        result = {
            "device": device,
            "date": date,
            "commit": commit or "unknown",
            "torch": torch.__version__,
            "bandwidth_h2d_gbps": bandwidth,
            "rows": rows,
        }
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))

    rows, bandwidth = bench(cases, tuple(args.systems), args.host_memory_gib, checkpoint=write)
    add_ratios(rows)
    write(rows, bandwidth)
    table = markdown(rows)
    (out / f"{stem}.md").write_text(table + "\n")
    plot(rows, out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
