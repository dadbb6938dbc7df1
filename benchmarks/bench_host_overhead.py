"""Host (Python) time of a latency-mode decode step, measured on a CPU with a tiny model.

On the H200 the offloaded and tiered decode steps are bound by the host's issue cost (about 44 us
per launched aten op against 5-8 us for a bare CUDA launch): most of it is the Python kvpr runs
around each op. With hidden sizes shrunk so that the aten work is negligible, a CPU run of the
same executor, family layer code, chunk structure and tiers shows that Python cost directly. Per
case and per decode step: wall time, the aten ops the step issues (counted by
``kvpr.sim.host_ops``, which also prices each stream call and Triton launch as one op), and wall
time per op; a layer's share is the difference of runs with ``--layers`` and twice as many.

    python benchmarks/bench_host_overhead.py --allow-dirty --out /tmp/h          # while developing
    python benchmarks/bench_host_overhead.py --out benchmarks/results --baseline OLD.json
    python benchmarks/bench_host_overhead.py --profile offloaded                  # cProfile, top 30
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import add_provenance_args, header_or_exit  # noqa: E402

from kvpr.cache.storage import CacheShape, KVStorage  # noqa: E402
from kvpr.config import SamplingParams  # noqa: E402
from kvpr.models.loader import build_model, init_dummy_weights  # noqa: E402
from kvpr.models.registry import builtin_config  # noqa: E402
from kvpr.runtime.latency import OverlappedExecutor  # noqa: E402
from kvpr.runtime.sampling import sample_next  # noqa: E402
from kvpr.runtime.tiers import TierPlan  # noqa: E402
from kvpr.scheduler.plan import StepSplit  # noqa: E402
from kvpr.sim.host_ops import count_ops  # noqa: E402

if TYPE_CHECKING:
    from kvpr.config import ModelConfig


@dataclass(frozen=True)
class Case:
    """One decode configuration: where the cache lives and how much of the host tier is recomputed."""

    name: str
    model: str  # a built-in config, shrunk by ``tiny`` (its family and GQA group kept)
    offloaded: bool  # False: --offload none, the whole cache on the compute device
    gpu_share: float  # share of the batch's slots in the GPU tier (0: every token on the host)
    recompute: float  # share of the host tier's tokens recomputed from X each step


CASES = (
    Case("offloaded", "opt-6.7b", True, 0.0, 1.0),  # the paper workload's shape: every token on the host
    Case("tiered", "opt-6.7b", True, 0.75, 0.5),  # a GPU-resident prefix, the host tier split
    Case("gpu", "opt-6.7b", False, 1.0, 0.0),  # --offload none
    Case("offloaded-llama", "llama-3-8b", True, 0.0, 1.0),
    Case("tiered-llama", "llama-3-8b", True, 0.75, 0.5),
)


@dataclass(frozen=True)
class Workload:
    """Sizes shared by every case: small enough that aten work is negligible next to Python."""

    batch_size: int = 1
    prompt_len: int = 64
    gen_len: int = 32  # decode steps available (fewer than a flush block: no flush in the timed steps)
    slot_tokens: int = 16  # a quarter of the prompt: the paper workload's 4 chunks of 64 tokens at 256
    head_dim: int = 16
    num_kv_heads: int = 2


def tiny(model: "ModelConfig", num_layers: int, work: Workload) -> "ModelConfig":
    """``model``'s family and GQA group at hidden sizes where each aten op costs about nothing."""
    group = model.num_q_heads // model.num_kv_heads
    n_q, d = work.num_kv_heads * group, work.head_dim
    proj = None if model.word_embed_proj_dim is None else n_q * d
    return replace(
        model, num_layers=num_layers, vocab_size=64, hidden_size=n_q * d, intermediate_size=2 * n_q * d,
        num_q_heads=n_q, num_kv_heads=work.num_kv_heads, head_dim=d, word_embed_proj_dim=proj,
    )  # fmt: skip


def make_step(case: Case, num_layers: int, work: Workload) -> Callable[[], object]:
    """A warmed executor after its prefill, as a callable running one decode step and greedy sampling."""
    config = tiny(builtin_config(case.model), num_layers, work)
    cpu = torch.device("cpu")
    model = build_model(config)
    init_dummy_weights(model, cpu, torch.float32, seed=0)
    max_len = work.prompt_len + work.gen_len + 8
    shape = CacheShape.for_model(config, work.batch_size, max_len, torch.float32)
    storage = KVStorage(shape, cpu, pin=False, store_inputs=case.offloaded and case.recompute > 0)
    plan = TierPlan.for_capacity(round(case.gpu_share * max_len), max_len) if case.offloaded else None

    def split(host_len: int) -> StepSplit:
        return StepSplit(round(case.recompute * host_len))

    slots = work.slot_tokens if case.offloaded else None
    executor = OverlappedExecutor(model, storage, cpu, case.offloaded, split, plan, slot_tokens=slots)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (work.batch_size, work.prompt_len), generator=generator)
    with torch.inference_mode():
        executor.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    greedy = SamplingParams(temperature=0.0)
    state = {"ids": ids[:, -1]}

    def step() -> object:
        with torch.inference_mode():
            state["ids"] = sample_next(executor.decode(state["ids"]), greedy, None)
        return state["ids"]

    return step


def time_steps(step: Callable[[], object], steps: int, warmup: int = 3) -> float:
    """Median seconds of one step over ``steps`` (after ``warmup``)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_case(case: Case, num_layers: int, work: Workload, repeats: int) -> dict[str, Any]:
    """Per step at ``num_layers`` and ``2 * num_layers``; a layer's share by difference."""
    steps_each = work.gen_len - 4  # 3 warm-up steps and one counted step follow in the same executor
    rows = {}
    for layers in (num_layers, 2 * num_layers):
        walls, ops = [], 0
        for _ in range(repeats):  # a fresh executor each repeat: each runs at most gen_len steps
            step = make_step(case, layers, work)
            walls.append(time_steps(step, steps_each))
            ops = count_ops(step)
        rows[layers] = (min(walls), ops)  # min over repeats: the machine is shared
    (wall_1, ops_1), (wall_2, ops_2) = rows[num_layers], rows[2 * num_layers]
    layer_wall, layer_ops = (wall_2 - wall_1) / num_layers, (ops_2 - ops_1) / num_layers
    return {
        **asdict(case),
        "num_layers": num_layers,
        "step_ms": round(wall_1 * 1e3, 4),
        "step_ops": ops_1,
        "step_us_per_op": round(wall_1 * 1e6 / ops_1, 2),
        "layer_us": round(layer_wall * 1e6, 1),
        "layer_ops": layer_ops,
        "layer_us_per_op": round(layer_wall * 1e6 / layer_ops, 2),
    }


def profile_case(case: Case, num_layers: int, work: Workload, top: int) -> None:
    """cProfile of the decode steps of one case, sorted by own time."""
    step = make_step(case, num_layers, work)
    for _ in range(3):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(work.gen_len - 4):
        step()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


def table(rows: list[dict[str, Any]], baseline: dict[str, dict[str, Any]]) -> str:
    head = f"{'case':16} {'step ms':>8} {'ops':>5} {'us/op':>6} {'layer us':>9} {'ops':>5} {'us/op':>6}"
    lines = [head + "  before: step ms, layer us"]
    for row in rows:
        old = baseline.get(row["name"])
        before = f"  {old['step_ms']:8.3f} {old['layer_us']:9.1f}" if old else ""
        lines.append(
            f"{row['name']:16} {row['step_ms']:8.3f} {row['step_ops']:5d} {row['step_us_per_op']:6.2f} "
            f"{row['layer_us']:9.1f} {row['layer_ops']:5.0f} {row['layer_us_per_op']:6.2f}{before}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="layers of the smaller run (the larger has twice)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh executors per case; the fastest is kept")
    parser.add_argument("--cases", nargs="+", default=[case.name for case in CASES])
    parser.add_argument("--profile", default=None, help="a case to run under cProfile instead")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--baseline", type=Path, default=None, help="an earlier JSON of this script: 'before'")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    add_provenance_args(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Workload()
    by_name = {case.name: case for case in CASES}
    if args.profile is not None:
        profile_case(by_name[args.profile], args.layers, work, args.top)
        return 0
    header = header_or_exit(args.allow_dirty)
    rows = [measure_case(by_name[name], args.layers, work, args.repeats) for name in args.cases]
    before: dict[str, Any] = json.loads(args.baseline.read_text()) if args.baseline else {}
    baseline = {row["name"]: row for row in before.get("cases", [])}
    print(table(rows, baseline))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"host-overhead-cpu-{header['date']}.json"
        result = {**header, "workload": asdict(work), "cases": rows}
        if before:
            result["before"] = {"commit": before.get("commit"), "cases": before.get("cases", [])}
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
