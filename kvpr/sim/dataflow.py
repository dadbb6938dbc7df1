"""Cycles of single operators from their tiling and dataflow (pure arithmetic, no torch).

Output-stationary GEMM ``[M, K] x [K, N]`` on an ``R x C`` PE array (KVO-LLM's matrix cores): each
PE holds one output; a tile of ``R x C`` outputs takes ``K`` cycles of MACs while the operands are
skewed in from the left and the top, plus ``R - 1`` and ``C - 1`` cycles to fill and drain the
skew, and tiles do not overlap::

    tiles  = ceil(M / R) * ceil(N / C)
    cycles = tiles * (K + R + C - 2) - 1

which is SCALE-Sim 3.0's output-stationary compute-cycle count (checked on three GEMMs in
tests/test_sim.py). With several cores the N tiles are dealt out round-robin; the weights stream
from DRAM through a double-buffered prefetch, so a core's time is ``first load + per tile
max(compute, load)`` with the cores' loads sharing the bandwidth. A decode GEMM's activations
``[b, K]`` stay in the core's SRAM for all of its N tiles; when they do not fit, the batch is cut
into row groups that do, and the weights stream once per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvpr.sim.hardware import Accelerator
from kvpr.sim.workload import Gemm, Op


@dataclass(frozen=True)
class OpCycles:
    """One op's time and traffic on the machine, for the whole batch, in cycles and bytes."""

    name: str
    unit: str
    compute: float  # cycles the op's engine is busy
    memory: float  # cycles of its DRAM traffic at the achieved efficiency
    cycles: float  # the op's time when it runs alone (pipelined compute and loads)
    macs: float
    elements: float
    dram_bytes: float
    sram_bytes: float
    precision: str

    def scaled(self, count: int) -> OpCycles:
        """The same op run ``count`` times (identical layers)."""
        return OpCycles(
            self.name, self.unit, self.compute * count, self.memory * count, self.cycles * count,
            self.macs * count, self.elements * count, self.dram_bytes * count, self.sram_bytes * count,
            self.precision,
        )  # fmt: skip


def os_tiles(gemm: Gemm, rows: int, cols: int) -> int:
    return math.ceil(gemm.m / rows) * math.ceil(gemm.n / cols) * gemm.count


def os_gemm_cycles(gemm: Gemm, rows: int, cols: int, macs_per_pe: float = 1.0) -> int:
    """Output-stationary cycles of ``gemm`` on one ``rows x cols`` array (see the module docstring);
    ``macs_per_pe`` > 1 packs narrower operands, < 1 spends several cycles a MAC."""
    k = math.ceil(gemm.k / macs_per_pe)
    return os_tiles(gemm, rows, cols) * (k + rows + cols - 2) - 1


def pipelined(first_load: float, per_tile_compute: float, per_tile_load: float, tiles: int) -> float:
    """Double buffering: the first tile's load, then each tile's compute beside the next one's load."""
    if tiles <= 0:
        return 0.0
    return first_load + (tiles - 1) * max(per_tile_compute, per_tile_load) + per_tile_compute


def matrix_op(op: Op, machine: Accelerator) -> OpCycles:
    """A projection on the matrix cores: N tiles dealt to the cores, weights streamed once per row group."""
    assert op.gemm is not None
    core, cores, dram = machine.matrix, machine.num_matrix_cores, machine.dram
    g, per_pe = op.gemm, core.macs_per_pe_cycle(op.precision)
    act_width = 2 if op.precision == "fp16" else 1
    # row groups of the batch whose activations [rows, K] fit half the SRAM (the rest: weight prefetch
    # and outputs); each group streams the weights once
    fit_rows = max(core.rows, (core.sram_bytes // 2) // (g.k * act_width) // core.rows * core.rows)
    groups = math.ceil(g.m / fit_rows)
    col_tiles = math.ceil(g.n / core.cols)
    tiles_per_core = math.ceil(col_tiles / cores) * math.ceil(g.m / core.rows) * g.count
    k_cycles = math.ceil(g.k / per_pe)
    tile_compute = k_cycles + core.rows + core.cols - 2
    compute = tiles_per_core * tile_compute
    weight_bytes = op.weight_bytes * machine.weight_scale
    dram_bytes = weight_bytes * groups
    bytes_per_cycle = dram.bytes_per_s / machine.clock_hz * dram.efficiency(weight_bytes / col_tiles)
    memory = dram_bytes / bytes_per_cycle
    tile_load = memory / max(tiles_per_core, 1)  # every core loads its tile at once: the bandwidth is shared
    cycles = pipelined(tile_load, tile_compute, tile_load, tiles_per_core)
    # SRAM: the operands fed into the array edges each tile (rows + cols bytes a K step), weights written once
    sram = tiles_per_core * cores * k_cycles * (core.rows + core.cols) * act_width + dram_bytes
    return OpCycles(op.name, op.unit.value, compute, memory, cycles, op.macs, 0, dram_bytes, sram, op.precision)


def attention_op(op: Op, machine: Accelerator) -> OpCycles:
    """An op of the attention core, alone: its unit's cycles beside its DRAM cycles (K,V reads, and
    without fusion the intermediate it writes for the next op, which that op reads back)."""
    core, dram = machine.attention, machine.dram
    peak_per_cycle = dram.bytes_per_s / machine.clock_hz
    if op.macs:
        compute = op.macs / core.macs_per_cycle(op.precision)
    elif op.name == "dsq" or op.name == "dequant":
        compute = op.elements / (core.dsq_per_cycle if machine.sparse_attention else core.lanes / 4)
    elif op.name == "topk":
        compute = op.elements / core.topk_per_cycle
    elif op.name == "softmax":
        compute = op.elements / core.softmax_per_cycle
    else:
        compute = 0.0
    kv_bytes = op.kv_bytes
    kv_memory = kv_bytes / (peak_per_cycle * dram.efficiency(op.kv_run_bytes)) if kv_bytes else 0.0
    inter = 0.0 if machine.fusion else 2 * op.inter_bytes  # written, then read back by the next op
    memory = kv_memory + inter / (peak_per_cycle * dram.eff_max)
    sram = 2 * kv_bytes + 2 * op.inter_bytes  # landed, then read; intermediates through SRAM when fused
    return OpCycles(
        op.name, op.unit.value, compute, memory, max(compute, memory), op.macs, op.elements,
        kv_bytes + inter, sram, op.precision,
    )  # fmt: skip


def fused_chain(ops: list[OpCycles], heads: int) -> float:
    """Cycles of the attention core's fused chain: the (sequence, head) pairs stream through the units
    (MAC lanes, DSQ, top-k, softmax) and the DRAM as pipeline stages, so the chain takes its busiest
    stage's total plus one pair's pass through the others (fill and drain)."""
    stages: dict[str, float] = {"dram": sum(op.memory for op in ops)}
    for op in ops:
        unit = "lanes" if op.macs else op.name
        stages[unit] = stages.get(unit, 0.0) + op.compute
    busiest = max(stages.values())
    fill = (sum(stages.values()) - busiest) / max(heads, 1)
    return busiest + fill
