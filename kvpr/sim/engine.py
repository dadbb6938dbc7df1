"""One decode step on an accelerator: per-op cycles assembled into phases, the two techniques applied,
utilisation and energy (pure arithmetic over the workload and the machine).

Per layer the matrix cores run the projections and the MLP (the linear phase) and the attention core
the attention chain (the attention phase), which depend on each other within a batch:

    interleave off:  layer = linear + attention                          (one batch)
    interleave on:   two batches A, B; A's linear beside B's attention and the other way round,
                     both sharing the DRAM: stage = max(linear compute, attention compute,
                     linear DRAM + attention DRAM); a layer of both batches takes two stages

The fused attention chain is a pipeline over (sequence, head) pairs (:func:`fused_chain`); unfused,
its ops run one after the other, each writing its output to DRAM for the next. Throughput counts the
tokens of every batch in flight; a batch's step time (its latency per token) covers all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kvpr.sim.dataflow import OpCycles, attention_op, fused_chain, matrix_op
from kvpr.sim.hardware import Accelerator
from kvpr.sim.workload import DecodeStep, LayerWork, Unit


@dataclass(frozen=True)
class PhaseTime:
    """One layer group's phases, per layer, in cycles."""

    kind: str
    count: int
    linear: float  # the matrix cores' ops one after another
    attention: float  # the attention chain (fused or not)
    stage: float  # with interleaving: the time of one stage (a layer per batch); else linear + attention
    linear_dram_bytes: float
    attention_dram_bytes: float
    attention_macs: float
    linear_macs: float


@dataclass(frozen=True)
class SimResult:
    """A decode step on ``machine``: per-op totals over the step, phases, time, utilisation, energy."""

    machine: Accelerator
    step: DecodeStep
    ops: tuple[OpCycles, ...]  # summed over the layers that run them
    phases: tuple[PhaseTime, ...]
    head_cycles: float
    batches_in_flight: int

    @property
    def cycles(self) -> float:
        """Cycles between two tokens of one batch (all batches in flight advance once)."""
        layers = sum(p.stage * p.count for p in self.phases)
        return self.batches_in_flight * (layers + self.head_cycles)

    @property
    def seconds(self) -> float:
        return self.cycles / self.machine.clock_hz

    @property
    def tokens_per_s(self) -> float:
        return self.batches_in_flight * self.step.batch_size / self.seconds

    def _sum(self, name: str) -> float:
        return sum(getattr(op, name) for op in self.ops)

    @property
    def macs(self) -> float:
        """MACs of one batch's step."""
        return self._sum("macs")

    @property
    def dram_bytes(self) -> float:
        return self._sum("dram_bytes")

    def energy_j(self) -> dict[str, float]:
        """Energy of one batch's step by component (joules); ``static`` over its share of the time."""
        e = self.machine.energy
        mac = sum(op.macs * e.mac_pj(op.precision) for op in self.ops)
        vector = sum(op.elements * e.vector_op_pj for op in self.ops)
        sram = self._sum("sram_bytes") * e.sram_pj_per_byte
        dram = self.dram_bytes * e.dram_pj_per_byte
        static = e.static_mw * 1e-3 * self.seconds / self.batches_in_flight * 1e12
        return {
            k: v * 1e-12
            for k, v in {"mac": mac, "vector": vector, "sram": sram, "dram": dram, "static": static}.items()
        }

    def op_energy_j(self) -> dict[str, float]:
        """Dynamic energy of each op (MACs, element-wise work, SRAM and DRAM bytes), joules."""
        e = self.machine.energy
        return {
            op.name: 1e-12 * (op.macs * e.mac_pj(op.precision) + op.elements * e.vector_op_pj
                              + op.sram_bytes * e.sram_pj_per_byte + op.dram_bytes * e.dram_pj_per_byte)
            for op in self.ops
        }  # fmt: skip

    def chip_energy_j(self) -> float:
        """Everything but the DRAM's own energy (what a chip's GOPS/W counts)."""
        energy = self.energy_j()
        return sum(v for k, v in energy.items() if k != "dram")

    def gops_per_w(self, with_dram: bool = False) -> float:
        energy = sum(self.energy_j().values()) if with_dram else self.chip_energy_j()
        return 2 * self.macs / energy / 1e9

    @property
    def linear_precision(self) -> str:
        return next((op.precision for op in self.ops if op.unit == Unit.MATRIX.value), "int8")

    def utilisation(self) -> dict[str, float]:
        """Attention PE, matrix PE and DRAM bandwidth utilisation of each phase, over the step's layers."""
        m = self.machine
        lanes = m.attention.macs_per_cycle("int8")
        pes = m.num_matrix_cores * m.matrix.pes
        bw = m.dram.bytes_per_s / m.clock_hz
        att_macs = sum(p.attention_macs * p.count for p in self.phases)
        lin_macs = sum(p.linear_macs * p.count for p in self.phases) / m.matrix.macs_per_pe_cycle(self.linear_precision)
        lin_bytes = sum(p.linear_dram_bytes * p.count for p in self.phases)
        att_bytes = sum(p.attention_dram_bytes * p.count for p in self.phases)
        if m.interleave:  # both engines and the DRAM share each stage
            stages = sum(p.stage * p.count for p in self.phases)
            att_time = lin_time = stages
            lin_bw = att_bw = (lin_bytes + att_bytes) / (bw * stages)
        else:
            att_time = sum(p.attention * p.count for p in self.phases)
            lin_time = sum(p.linear * p.count for p in self.phases)
            att_bw, lin_bw = att_bytes / (bw * att_time), lin_bytes / (bw * lin_time)
        return {
            "attention_pe": att_macs / (lanes * att_time),
            "attention_dram_bw": att_bw,
            "linear_pe": lin_macs / (pes * lin_time),
            "linear_dram_bw": lin_bw,
        }


def _phase(group: LayerWork, machine: Accelerator, heads: int) -> tuple[PhaseTime, list[OpCycles]]:
    linear = [matrix_op(op, machine) for op in group.ops if op.unit is Unit.MATRIX]
    attention = [attention_op(op, machine) for op in group.ops if op.unit is Unit.ATTENTION]
    lin = sum(op.cycles for op in linear)
    att = fused_chain(attention, heads) if machine.fusion else sum(op.cycles for op in attention)
    lin_bytes = sum(op.dram_bytes for op in linear)
    att_bytes = sum(op.dram_bytes for op in attention)
    if machine.interleave:
        shared_dram = sum(op.memory for op in linear) + sum(op.memory for op in attention)
        lin_compute = sum(op.compute for op in linear)
        # fused: the chain's units without its DRAM stage (the DRAM is the shared term); unfused, the
        # chain's ops wait for their own loads one after another
        att_compute = (
            fused_chain([dataclasses.replace(op, memory=0.0) for op in attention], heads) if machine.fusion else att
        )
        stage = max(lin_compute, att_compute, shared_dram)
    else:
        stage = lin + att
    phase = PhaseTime(
        group.kind, group.count, lin, att, stage, lin_bytes, att_bytes,
        sum(op.macs for op in attention), sum(op.macs for op in linear),
    )  # fmt: skip
    return phase, [op.scaled(group.count) for op in linear + attention]


def simulate(step: DecodeStep, machine: Accelerator) -> SimResult:
    """The step on ``machine`` (build ``step`` with the machine's codec: see :func:`kvpr.sim.run.machine_step`)."""
    heads = step.batch_size * max(1, _kv_heads(step))
    phases, ops = [], []
    for group in step.layers:
        phase, group_ops = _phase(group, machine, heads)
        phases.append(phase)
        ops += group_ops
    head = [matrix_op(op, machine) for op in step.head]
    ops += head
    merged: dict[str, OpCycles] = {}
    for op in ops:  # one entry per op name over the step (dense and KVO layers together)
        prior = merged.get(op.name)
        merged[op.name] = op if prior is None else OpCycles(
            op.name, op.unit, prior.compute + op.compute, prior.memory + op.memory, prior.cycles + op.cycles,
            prior.macs + op.macs, prior.elements + op.elements, prior.dram_bytes + op.dram_bytes,
            prior.sram_bytes + op.sram_bytes, op.precision,
        )  # fmt: skip
    return SimResult(
        machine, step, tuple(merged.values()), tuple(phases), sum(op.cycles for op in head),
        2 if machine.interleave else 1,
    )  # fmt: skip


def _kv_heads(step: DecodeStep) -> int:
    """KV heads per layer, read back from an attention op's batched GEMM."""
    for group in step.layers:
        for op in group.ops:
            if op.gemm is not None and op.unit is Unit.ATTENTION:
                return op.gemm.count // step.batch_size
    return 1
