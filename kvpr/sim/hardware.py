"""The machines ``kvpr sim`` models: KVO-LLM's multi-core accelerator, the baselines in the same
model, and the published figures each constant comes from.

KVO-LLM (DAC 2025) publishes 28 nm, 4.83 mm2, 717 mW and 3287 GOPS peak (4584 GOPS/W), multiple
matrix cores with an output-stationary dataflow, a sparse attention core with the DSQ dequantizer
and a top-k unit, operator fusion and cross-batch interleaving (DESIGN.md section 3). It does not
publish the clock, the PE counts, the SRAM sizes, the DRAM or the energy per access. The values
chosen for those are marked UNPUBLISHED below: they are chosen once (the peak 2 x 2048 MACs x
800 MHz = 3276.8 GOPS is 0.3% under the published 3287) and never fitted per result.

Energy per operation: Horowitz, "Computing's energy problem", ISSCC 2014, Fig. 1.1.9 (45 nm, 0.9 V),
scaled to 28 nm by the feature size at the same voltage (dynamic energy ~ C V^2, C ~ feature size:
x 28/45 = 0.622). DRAM: O'Connor et al., "Fine-grained DRAM", MICRO 2017, Table 1 (HBM2 3.9 pJ/bit).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

NODE_SCALE = 28 / 45  # 45 nm -> 28 nm at 0.9 V: energy ~ capacitance ~ feature size (first order)


@dataclass(frozen=True)
class EnergyTable:
    """Energy per event in picojoules (28 nm), and static power; each field names its source."""

    # Horowitz ISSCC'14: 8b mult 0.2 pJ + 32b add 0.1 pJ (the accumulator), x NODE_SCALE
    mac_int8_pj: float = (0.2 + 0.1) * NODE_SCALE
    # Horowitz ISSCC'14: 16b FP mult 1.1 pJ + 16b FP add 0.4 pJ, x NODE_SCALE
    mac_fp16_pj: float = (1.1 + 0.4) * NODE_SCALE
    # 4b x 8b: an array multiplier's energy grows with the product of the widths (0.2 pJ x 4/8),
    # plus the 32b accumulate (0.1 pJ), x NODE_SCALE
    mac_int4_pj: float = (0.2 * 4 / 8 + 0.1) * NODE_SCALE
    # element-wise work (compare, dequantise: a 16b FP mult + add; an exponential taken as one),
    # Horowitz ISSCC'14 16b FP mult 1.1 + add 0.4 pJ, x NODE_SCALE
    vector_op_pj: float = (1.1 + 0.4) * NODE_SCALE
    # Horowitz ISSCC'14: a 64-bit read of a 32 KB SRAM 20 pJ -> 2.5 pJ/byte, x NODE_SCALE
    sram_pj_per_byte: float = 20.0 / 8 * NODE_SCALE
    # O'Connor et al. MICRO'17 Table 1: HBM2 3.9 pJ/bit (row activation, I/O and transfer)
    dram_pj_per_byte: float = 3.9 * 8
    # UNPUBLISHED: static power (leakage, clock tree, control) chosen so the model's power at the
    # peak is the published 717 mW (14% of it, within the usual range for 28 nm HPC logic)
    static_mw: float = 100.0

    def mac_pj(self, precision: str) -> float:
        return {"int8": self.mac_int8_pj, "int4": self.mac_int4_pj, "fp16": self.mac_fp16_pj}[precision]


@dataclass(frozen=True)
class MatrixCore:
    """An output-stationary PE array: ``rows`` x ``cols`` PEs, each one MAC a cycle at int8; int4
    operands pack two MACs a PE, fp16 takes ``fp16_cycles`` cycles a MAC."""

    rows: int = 16  # UNPUBLISHED
    cols: int = 16  # UNPUBLISHED
    sram_bytes: int = 512 * 1024  # UNPUBLISHED: activations, partial outputs, weight prefetch
    fp16_cycles: int = 4  # an int8 PE array running fp16 operands (not used by KVO-LLM's int8 path)

    @property
    def pes(self) -> int:
        return self.rows * self.cols

    def macs_per_pe_cycle(self, precision: str) -> float:
        return {"int8": 1.0, "int4": 2.0, "fp16": 1.0 / self.fp16_cycles}[precision]


@dataclass(frozen=True)
class AttentionCore:
    """The sparse attention core: MAC lanes for q.K and p.V, the DSQ dequantizer, the top-k unit
    and the softmax unit, all fed from one SRAM; fused, they stream one (sequence, head) after another."""

    lanes: int = 1024  # UNPUBLISHED: int8 MACs a cycle (half as many at fp16)
    dsq_per_cycle: int = 256  # UNPUBLISHED: values dequantised a cycle (DSQ: anchor + difference)
    topk_per_cycle: int = 16  # UNPUBLISHED: scores entering the top-k sorter a cycle
    softmax_per_cycle: int = 32  # UNPUBLISHED: exponentials a cycle
    sram_bytes: int = 512 * 1024  # UNPUBLISHED: a (sequence, head)'s selected chunks and scores

    def macs_per_cycle(self, precision: str) -> float:
        return self.lanes * (0.5 if precision == "fp16" else 1.0)


@dataclass(frozen=True)
class Dram:
    """External memory: a peak bandwidth and the efficiency of an access of ``n`` contiguous bytes,
    ``eff(n) = eff_max * n / (n + n_half)`` (row activation and burst granularity amortised over
    the run; ``n_half``: the run length at half the streaming efficiency)."""

    bytes_per_s: float = 256e9  # UNPUBLISHED: one HBM2 stack, 1024 bits x 2 Gb/s (JEDEC JESD235)
    eff_max: float = 0.9  # assumed: refresh and read/write turnaround
    n_half: float = 64.0  # assumed: two 32-byte HBM2 bursts (pseudo-channel BL4 x 64 bits)

    def efficiency(self, run_bytes: float) -> float:
        if run_bytes <= 0:
            return self.eff_max
        return self.eff_max * run_bytes / (run_bytes + self.n_half)


@dataclass(frozen=True)
class Accelerator:
    """A configurable multi-core design: matrix cores, one attention core, DRAM, clock, energy, and the
    two techniques as switches."""

    name: str
    clock_hz: float = 800e6  # UNPUBLISHED
    num_matrix_cores: int = 4  # UNPUBLISHED ("multi-core"): 4 x 16 x 16
    matrix: MatrixCore = field(default_factory=MatrixCore)
    attention: AttentionCore = field(default_factory=AttentionCore)
    dram: Dram = field(default_factory=Dram)
    energy: EnergyTable = field(default_factory=EnergyTable)
    kv_codec: str = "kvo"  # how K,V are stored: kvo, int4, int8, fp16
    weight_bits: int = 8
    fusion: bool = True  # scores, top-k, softmax and dequantisation fused: no intermediate in DRAM
    interleave: bool = True  # two batches: one's projections/MLP beside the other's attention
    sparse_attention: bool = True  # a DSQ dequantizer and top-k unit (else dequantise on the lanes)
    weight_scale: float = 1.0  # stored weight bytes / int8 weight bytes (compressed-weight baselines)
    notes: str = ""

    def with_(self, **changes: object) -> Accelerator:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @property
    def peak_macs_per_cycle(self) -> float:
        matrix = self.num_matrix_cores * self.matrix.pes * self.matrix.macs_per_pe_cycle("int8")
        return matrix + self.attention.macs_per_cycle("int8")

    @property
    def peak_gops(self) -> float:
        """Two operations per MAC, every MAC unit busy at int8."""
        return 2 * self.peak_macs_per_cycle * self.clock_hz / 1e9

    @property
    def peak_power_w(self) -> float:
        """Power with every MAC busy at int8, each operand pair read from SRAM once per PE row or
        column (output-stationary: (rows + cols) bytes feed rows x cols MACs), plus static power."""
        e, m = self.energy, self.matrix
        sram_per_mac = (m.rows + m.cols) / m.pes
        dynamic = self.peak_macs_per_cycle * self.clock_hz * (e.mac_int8_pj + sram_per_mac * e.sram_pj_per_byte)
        return dynamic * 1e-12 + e.static_mw * 1e-3


# The paper's published figures, for the comparison tables.
PAPER = {
    "peak_gops": 3287.0,
    "gops_per_w": 4584.0,
    "power_mw": 717.0,
    "area_mm2": 4.83,
    "throughput_vs_baselines": (7.32, "up to, against Tender, OPAL and MECLA"),
    "energy_efficiency_vs_baselines": (5.52, 8.38),
    "attention_pe_utilisation": (0.25, 0.93),
    "qkv_bandwidth_utilisation": (0.25, 0.67),
    "kv_ema_reduction": 0.91,
}


def kvo_llm() -> Accelerator:
    """KVO-LLM as published, with the unpublished parameters above."""
    return Accelerator("kvo-llm", notes="KVO cache, DSQ + top-k unit, fusion and cross-batch interleaving")


def dense_baseline(kv_codec: str = "fp16") -> Accelerator:
    """The same area and clock without KVO's techniques: K,V stored by a dense codec, attended in full,
    no fusion (scores and probabilities go through DRAM), no interleaving, no DSQ/top-k unit."""
    return Accelerator(
        f"dense-{kv_codec}",
        kv_codec=kv_codec,
        fusion=False,
        interleave=False,
        sparse_attention=False,
        notes=f"same PEs and clock; {kv_codec} K,V attended in full; no fusion, no interleaving",
    )


def baselines() -> list[Accelerator]:
    """Stand-ins for the paper's baselines, as far as their published descriptions allow, on KVO-LLM's
    PEs, clock and DRAM so that only the KV treatment and dataflow differ (assumptions in ``notes``)."""
    return [
        dense_baseline("fp16"),
        dense_baseline("int8"),
        dense_baseline("int4").with_(
            name="tender-like",
            notes="Tender (ISCA 2024): runtime-requantised INT4 activations and KV per channel group; "
            "taken as kvpr's int4 K,V (groups of 32, fp16 scale and zero), dense attention, no fusion",
        ),
        dense_baseline("int4").with_(
            name="opal-like",
            weight_bits=4,
            notes="OPAL (DAC 2024): outlier-preserved microscaling, 4-bit weights and activations; "
            "taken as 4-bit weights and kvpr's int4 K,V, dense attention, no fusion",
        ),
        dense_baseline("int8").with_(
            name="mecla-like",
            weight_scale=0.5,
            notes="MECLA (ISCA 2024): sub-matrix partition and scaling halves weight accesses; "
            "taken as int8 weights at half the bytes and kvpr's int8 K,V, dense attention, no fusion",
        ),
    ]
