"""Throughput mode's policy search: FlexGen's placement LP (scipy ``linprog``) over GPU/CPU/disk,
extended with partial KV recomputation, per block shape; then rounding to whole tensors and integer
percentages, each candidate checked by the cost model (``throughput_cost.estimate``).

``search_policy`` is kvpr's search; ``flexgen_policy`` the same without recomputation, FlexGen's
own; ``recompute_fraction_policy`` is ``--recompute auto`` for a fixed policy.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linprog

from kvpr.config import ModelConfig
from kvpr.errors import KvprError
from kvpr.scheduler.throughput_bytes import (
    GIB,
    NO_CODECS,
    BlockCosts,
    CacheCodecs,
    Shares,
    ThroughputWorkload,
    layer_weight_tensors,
    resident_weight_elements,
    weight_shares,
)
from kvpr.scheduler.throughput_cost import (
    MachineLimits,
    ThroughputPlan,
    block_costs,
    check_workload,
    cost_terms,
    estimate,
)
from kvpr.throughput_config import Placement, ThroughputConfig, Tier

if TYPE_CHECKING:
    from kvpr.scheduler.profile import HardwareProfile

_UNLIMITED = 1e18  # bytes: memory limits of a policy that was already checked to fit
DEFAULT_GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_NUM_GPU_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_MAX_ROUNDED = 8  # block shapes per mode (X stored or not) rounded at most, best LP bound first
_NUM_SHARES = len(Shares._fields) - 1
_T_PRE, _T_DEC = _NUM_SHARES, _NUM_SHARES + 1  # LP variables after the shares: seconds per layer
_NUM_VARS = _NUM_SHARES + 2
_INDEX = {name: i for i, name in enumerate(Shares._fields[:_NUM_SHARES])}


# ---------------------------------------------------------------- the search


@dataclass(frozen=True)
class _Solution:
    block: BlockCosts
    shares: Mapping[str, float]
    bound_tokens_per_s: float


def _solve(block: BlockCosts, limits: MachineLimits, allow_disk: bool, fixed: Mapping[str, float]) -> _Solution | None:
    """Minimise prefill + decode time per layer over the shares: T >= every term, memory within every tier."""
    workload, steps = block.workload, block.workload.decode_steps
    unit = np.eye(_NUM_VARS + 1)  # the last column is the constant
    terms = cost_terms(block, Shares._make([*unit[:_NUM_SHARES], unit[_NUM_VARS]]))
    scale = max(block.prefill_compute_s, block.decode_compute_s)  # times in these units keep HiGHS accurate
    rows, rhs = [], []
    for phase_terms, t_var in ((terms.prefill, _T_PRE), (terms.decode, _T_DEC)):
        for expr in phase_terms.values():
            row = expr[:_NUM_VARS] / scale
            row[t_var] -= 1.0
            rows.append(row)
            rhs.append(-expr[_NUM_VARS] / scale)
    for tier, items in terms.memory.items():
        expr, capacity = sum(items.values()), limits.capacity(tier)
        norm = max(capacity, GIB)
        rows.append(expr[:_NUM_VARS] / norm)
        rhs.append((capacity - expr[_NUM_VARS]) / norm)
    # token counts within their tiers' slots: a faster tier holds at most its slots
    s_max, s0, mean = workload.max_len, workload.prompt_len, workload.mean_context
    for tokens, length in ((("tg",), mean), (("tg", "tcx", "tck"), mean), (("pg",), s0), (("pg", "pc"), s0)):
        row = np.zeros(_NUM_VARS)
        row[[_INDEX[name] for name in tokens]] = length / s_max
        row[_INDEX["cg"]] -= 1.0
        row[_INDEX["cc"]] -= 1.0 if len(tokens) > 1 else 0.0
        rows.append(row)
        rhs.append(0.0)
    groups = (
        ("wg", "wc", "wd"),
        ("cg", "cc", "cd"),
        ("ag", "ac", "ad"),
        ("tg", "tcx", "tck", "td"),
        ("pg", "pc", "pd"),
    )
    equal = np.zeros((len(groups), _NUM_VARS))
    for i, group in enumerate(groups):
        equal[i, [_INDEX[name] for name in group]] = 1.0
    bounds = [(0.0, 1.0)] * _NUM_SHARES + [(0.0, None)] * 2
    for name in ("wd", "cd", "ad") if not allow_disk else ():
        bounds[_INDEX[name]] = (0.0, 0.0)
    if not block.stores_x:
        bounds[_INDEX["tcx"]] = (0.0, 0.0)
    for name, value in fixed.items():
        bounds[_INDEX[name]] = (value, value)
    cost = np.zeros(_NUM_VARS)
    cost[_T_PRE], cost[_T_DEC] = 1.0, steps
    # ties (a term with slack): keep bytes on faster tiers, recompute no more than pays
    for names, weight in ((("wc", "cc", "ac", "tcx"), 1e-7), (("wd", "cd", "ad"), 2e-7)):
        cost[[_INDEX[name] for name in names]] = weight * (1 + steps)
    result = linprog(cost, np.array(rows), np.array(rhs), equal, np.ones(len(groups)), bounds, method="highs")
    if result.status != 0:
        return None
    x = result.x
    seconds = block.model.num_layers * scale * (x[_T_PRE] + steps * x[_T_DEC]) + (1 + steps) * block.head_s
    shares = {name: float(x[i]) for name, i in _INDEX.items()}
    return _Solution(block, shares, float(block.block_size * workload.gen_len / seconds))


def _snap(table: Sequence[float], share: float) -> set[int]:
    """Integer percentages realising the nearest achievable share at or below ``share`` and at or above it;
    of the percentages realising one share, the one closest to it (so the percentage reads as the bytes)."""
    below = max(value for value in table if value <= share + 1e-12)
    above = min(value for value in table if value >= share - 1e-12)
    return {min((p for p in range(101) if table[p] == v), key=lambda p: abs(p - 100 * v)) for v in (below, above)}


def _finalise(
    solution: _Solution,
    model: ModelConfig,
    profile: HardwareProfile,
    limits: MachineLimits,
    allow_disk: bool,
    offload_dir: str | None,
    dtype_bytes: int,
    codecs: CacheCodecs,
    compress_weight: bool,
) -> ThroughputPlan | None:
    """Snap weights to whole tensors and activations to one tier, re-solve the cache shares, round them to
    integer percentages, and return the best rounded policy that ``estimate`` accepts."""
    block, shares, workload = solution.block, solution.shares, solution.block.workload
    table = [weight_shares(model, Placement(p, 100 - p, 0, 100, 100, 0))[0] for p in range(101)]
    gpu_cuts = _snap(table, shares["wg"])
    cpu_cuts = _snap(table, shares["wg"] + shares["wc"]) if allow_disk else {100}
    tiers = (Tier.GPU, Tier.CPU, Tier.DISK) if allow_disk else (Tier.GPU, Tier.CPU)
    act_percent = {Tier.GPU: (100.0, 0.0), Tier.CPU: (0.0, 100.0), Tier.DISK: (0.0, 0.0)}
    best: ThroughputPlan | None = None
    for cut1 in gpu_cuts:
        for cut2 in (c for c in cpu_cuts if c >= cut1):
            for act in tiers:
                fixed = {"wg": table[cut1], "wc": table[cut2] - table[cut1], "wd": 1.0 - table[cut2]}
                fixed |= {name: float(t is act) for t, name in zip(tiers, ("ag", "ac", "ad"))}
                again = _solve(block, limits, allow_disk, fixed)
                if again is None:
                    continue
                cpu_tokens = again.shares["tcx"] + again.shares["tck"]
                r = round(again.shares["tcx"] / cpu_tokens, 2) if block.stores_x and cpu_tokens > 1e-9 else 0.0
                q1, q2 = 100 * again.shares["cg"], 100 * (again.shares["cg"] + again.shares["cc"])
                firsts = _near_integers(q1)
                seconds = _near_integers(q2) if allow_disk else [100]
                for g in firsts:  # nearest first: among equally fast policies the first found is kept
                    for c in (c for c in seconds if c >= g):
                        placement = Placement(cut1, cut2 - cut1, g, c - g, *act_percent[act])
                        config = ThroughputConfig(
                            placement,
                            block.gpu_batch_size,
                            block.num_gpu_batches,
                            offload_dir=offload_dir,
                            compress_weight=compress_weight,
                        )
                        for fraction in sorted({r, 0.0}, reverse=True):
                            try:
                                plan = estimate(model, profile, limits, workload, config, fraction, dtype_bytes, codecs)
                            except KvprError:
                                continue
                            if best is None or _better(plan, best):
                                best = plan
    return None if best is None else replace(best, bound_tokens_per_s=solution.bound_tokens_per_s)


def _near_integers(percent: float) -> list[int]:
    """floor - 1, floor and floor + 1 within [0, 100], the nearest to ``percent`` first."""
    around = {min(100, max(0, math.floor(percent) + d)) for d in (-1, 0, 1)}
    return sorted(around, key=lambda p: (abs(p - percent), p))


def _better(plan: ThroughputPlan, than: ThroughputPlan) -> bool:
    """Faster; or as fast (to 1e-9) with less recomputation, or as much and fewer, larger GPU batches
    (launch overheads, which the model leaves out, favour them)."""
    if plan.tokens_per_s > than.tokens_per_s * (1 + 1e-9):
        return True
    if plan.tokens_per_s < than.tokens_per_s * (1 - 1e-9):
        return False
    return (plan.recompute_fraction, -plan.config.gpu_batch_size) < (
        than.recompute_fraction,
        -than.config.gpu_batch_size,
    )


def search_policy(
    model: ModelConfig,
    profile: HardwareProfile,
    limits: MachineLimits,
    workload: ThroughputWorkload,
    *,
    allow_recompute: bool = True,
    gpu_batch_sizes: Sequence[int] = DEFAULT_GPU_BATCH_SIZES,
    num_gpu_batches: Sequence[int] = DEFAULT_NUM_GPU_BATCHES,
    dtype_bytes: int = 2,
    offload_dir: str | None = None,
    codecs: CacheCodecs = NO_CODECS,
    compress_weight: bool = False,
) -> ThroughputPlan:
    """The fastest policy: an LP per block shape and per choice of storing X, then rounding (``_finalise``).

    The disk tier is used only with an ``offload_dir`` and ``limits.disk_bytes > 0``. ``codecs`` and
    ``compress_weight``: what the CPU and disk tiers store, counted in encoded bytes.
    """
    if not gpu_batch_sizes or not num_gpu_batches or min(*gpu_batch_sizes, *num_gpu_batches) < 1:
        raise KvprError("search_policy: give at least one GPU batch size and one number of GPU batches, all >= 1")
    check_workload(model, workload)
    allow_disk = offload_dir is not None and limits.disk_bytes > 0
    found: dict[bool, list[_Solution]] = {False: [], True: []}
    for stores_x in (False, True) if allow_recompute else (False,):
        for gbs in sorted(gpu_batch_sizes):
            for ngb in sorted(num_gpu_batches):
                block = block_costs(
                    model, profile, limits, workload, gbs, ngb, stores_x, dtype_bytes, codecs, compress_weight
                )
                solution = _solve(block, limits, allow_disk, {})
                if solution is None:
                    break  # more GPU batches need more memory on every tier
                found[stores_x].append(solution)
            if solution is None and ngb == min(num_gpu_batches):
                break  # not even one GPU batch of this size fits: larger ones need more memory
    # Branch and bound over block shapes: round them best bound first until no bound beats the best
    # rounded plan. r = 0 goes first, so its result is exactly FlexGen's search and X can only add to it.
    best: ThroughputPlan | None = None
    for solutions in found.values():
        ranked = sorted(solutions, key=lambda s: (-s.bound_tokens_per_s, -s.block.gpu_batch_size))
        for solution in ranked[:_MAX_ROUNDED]:
            if best is not None and solution.bound_tokens_per_s <= best.tokens_per_s:
                break
            plan = _finalise(
                solution, model, profile, limits, allow_disk, offload_dir, dtype_bytes, codecs, compress_weight
            )
            if plan is not None and (best is None or _better(plan, best)):
                best = plan
    if best is None:
        raise _nothing_fits(model, limits, workload, min(gpu_batch_sizes), allow_disk, dtype_bytes)
    return best


def flexgen_policy(
    model: ModelConfig,
    profile: HardwareProfile,
    limits: MachineLimits,
    workload: ThroughputWorkload,
    *,
    gpu_batch_sizes: Sequence[int] = DEFAULT_GPU_BATCH_SIZES,
    num_gpu_batches: Sequence[int] = DEFAULT_NUM_GPU_BATCHES,
    dtype_bytes: int = 2,
    offload_dir: str | None = None,
    codecs: CacheCodecs = NO_CODECS,
    compress_weight: bool = False,
) -> ThroughputPlan:
    """FlexGen's search: the same LP without recomputation (r = 0, no X stored)."""
    return search_policy(
        model,
        profile,
        limits,
        workload,
        allow_recompute=False,
        gpu_batch_sizes=gpu_batch_sizes,
        num_gpu_batches=num_gpu_batches,
        dtype_bytes=dtype_bytes,
        offload_dir=offload_dir,
        codecs=codecs,
        compress_weight=compress_weight,
    )


def _nothing_fits(
    model: ModelConfig, limits: MachineLimits, workload: ThroughputWorkload, gbs: int, allow_disk: bool, e: int
) -> KvprError:
    """Name the tier that rules out even the smallest block (gpu batch ``gbs``, one batch, r = 0)."""
    layer = sum(math.prod(shape) for _, shape in layer_weight_tensors(model)) * e
    s0, h = workload.prompt_len, model.hidden_size
    gpu_floor = resident_weight_elements(model) * e + 2 * layer + 2 * gbs * workload.max_len * 2 * model.kv_size * e
    gpu_floor += gbs * s0 * e * (4 * h + model.intermediate_size) + gbs * model.num_q_heads * s0 * s0 * e
    host = limits.cpu_bytes + (limits.disk_bytes if allow_disk else 0.0)
    need = model.num_layers * (layer + gbs * workload.max_len * 2 * model.kv_size * e)
    if gpu_floor > limits.gpu_bytes:
        return KvprError(
            f"no throughput policy fits: a GPU batch of {gbs} needs about {gpu_floor / GIB:.2f} GiB of GPU memory "
            f"for embeddings, buffers and the prompt's working set, the GPU has {limits.gpu_bytes / GIB:.2f} GiB: "
            "use a shorter prompt or a larger GPU"
        )
    where = "CPU + disk" if allow_disk else "CPU (pass offload_dir to add the disk tier)"
    return KvprError(
        f"no throughput policy fits: weights and KV cache need about {need / GIB:.2f} GiB beyond the GPU, "
        f"{where} offer {host / GIB:.2f} GiB: add host memory or disk, or shorten the workload"
    )


def format_plans(plans: Sequence[tuple[str, ThroughputPlan]]) -> str:
    """A table of named plans: policy, batch shape, recompute fraction, predicted speed and memory."""
    from rich.console import Console
    from rich.table import Table

    table = Table(caption="tokens/s: block_size * gen_len / (prefill + decode); memory in GiB per tier")
    headers = ("policy", "--percent", "gbs", "ngb", "r", "tokens/s", "decode tok/s", "prefill s", "decode s")
    for header in (*headers, "GPU", "CPU", "disk"):
        table.add_column(header, justify="left" if header in ("policy", "--percent") else "right")
    for name, plan in plans:
        memory = plan.memory_bytes
        table.add_row(
            name,
            str(plan.config.placement),
            str(plan.config.gpu_batch_size),
            str(plan.config.num_gpu_batches),
            f"{plan.recompute_fraction:.2f}",
            f"{plan.tokens_per_s:.1f}",
            f"{plan.decode_tokens_per_s:.1f}",
            f"{plan.prefill_s:.3f}",
            f"{plan.decode_s:.3f}",
            *(f"{memory[tier.value] / GIB:.2f}" for tier in Tier),
        )
    out = io.StringIO()
    Console(file=out, width=160, color_system=None, force_terminal=False).print(table)
    return out.getvalue()


def recompute_fraction_policy(
    model: ModelConfig,
    profile: HardwareProfile,
    config: ThroughputConfig,
    dtype_bytes: int = 2,
    steps: int = 20,
    codecs: CacheCodecs = NO_CODECS,
) -> Callable[[int], float]:
    """``--recompute auto`` for a fixed throughput policy: at each decode step (``s`` cached tokens),
    the fraction of the CPU tier's tokens to recompute that minimises the predicted step, on a grid
    of ``steps + 1`` fractions (ties go to less recomputation). Memoised per ``s``."""
    room = MachineLimits(_UNLIMITED, _UNLIMITED, _UNLIMITED, 1e9, 1e9)  # the run already fits

    @functools.cache
    def fraction(context_len: int) -> float:
        prompt_len = max(1, min(context_len, model.max_position - 2))
        workload = ThroughputWorkload(prompt_len, 2)  # one decode step, at context prompt_len

        def step_s(r: float) -> float:
            return estimate(model, profile, room, workload, config, r, dtype_bytes, codecs).decode_s

        return min((i / steps for i in range(steps + 1)), key=step_s)

    return fraction
