"""``kvpr sim``'s results: one step on each machine (the accelerator, its ablations and the baselines),
the peak against the paper, the context/batch sweep, as a JSON-able dict and a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpr.config import ModelConfig
from kvpr.sim.engine import SimResult, simulate
from kvpr.sim.hardware import PAPER, Accelerator, baselines, kvo_llm
from kvpr.sim.workload import decode_step


def machine_step(model: ModelConfig, name: str, b: int, s: int, machine: Accelerator) -> SimResult:
    """``machine`` running the decode step of ``b`` sequences at context ``s`` with its own K,V codec."""
    return simulate(decode_step(model, name, b, s, machine.kv_codec, weight_bits=machine.weight_bits), machine)


def machines(kv_codec: str = "kvo") -> list[Accelerator]:
    """KVO-LLM with each technique on and off, then the baselines (``kv_codec``: the accelerator's codec)."""
    full = kvo_llm().with_(kv_codec=kv_codec)
    return [
        full,
        full.with_(name="kvo-llm, no fusion", fusion=False),
        full.with_(name="kvo-llm, no interleaving", interleave=False),
        full.with_(name="kvo-llm, neither", fusion=False, interleave=False),
        *baselines(),
    ]


def result_row(result: SimResult) -> dict[str, Any]:
    m, step = result.machine, result.step
    energy = result.energy_j()
    tokens = result.batches_in_flight * step.batch_size
    return {
        "machine": m.name,
        "kv_codec": m.kv_codec,
        "fusion": m.fusion,
        "interleave": m.interleave,
        "notes": m.notes,
        "batch_size": step.batch_size,
        "context_len": step.context_len,
        "batches_in_flight": result.batches_in_flight,
        "step_ms": 1e3 * result.seconds,
        "tokens_per_s": result.tokens_per_s,
        "kv_read_bytes_per_batch_step": step.kv_read_bytes,
        "dram_bytes_per_batch_step": result.dram_bytes,
        "energy_mj_per_token": {k: 1e3 * v / step.batch_size for k, v in energy.items()},
        "energy_mj_per_token_total": 1e3 * sum(energy.values()) / step.batch_size,
        "gops_per_w_chip": result.gops_per_w(),
        "gops_per_w_with_dram": result.gops_per_w(with_dram=True),
        "utilisation": result.utilisation(),
        "op_cycles": {op.name: op.cycles for op in result.ops},
        "op_energy_mj_per_token": {k: 1e3 * v / step.batch_size for k, v in result.op_energy_j().items()},
        "tokens_in_flight": tokens,
    }


def peak_row(machine: Accelerator) -> dict[str, Any]:
    gops, watts = machine.peak_gops, machine.peak_power_w
    return {
        "peak_gops": gops,
        "paper_peak_gops": PAPER["peak_gops"],
        "peak_gops_error": gops / PAPER["peak_gops"] - 1,
        "peak_power_mw": 1e3 * watts,
        "paper_power_mw": PAPER["power_mw"],
        "gops_per_w": gops / watts,
        "paper_gops_per_w": PAPER["gops_per_w"],
        "gops_per_w_error": gops / watts / PAPER["gops_per_w"] - 1,
        "chosen": {
            "clock_hz": machine.clock_hz,
            "matrix_cores": f"{machine.num_matrix_cores} x {machine.matrix.rows} x {machine.matrix.cols} int8 PEs",
            "attention_lanes": machine.attention.lanes,
            "static_mw": machine.energy.static_mw,
            "dram_bytes_per_s": machine.dram.bytes_per_s,
        },
    }


def headline(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """KVO-LLM against each other machine of one workload, beside the paper's figures."""
    by = {row["machine"]: row for row in rows}
    kvo = rows[0]
    ratios = {
        name: {
            "throughput": kvo["tokens_per_s"] / row["tokens_per_s"],
            "energy_efficiency": row["energy_mj_per_token_total"] / kvo["energy_mj_per_token_total"],
        }
        for name, row in by.items()
        if name != kvo["machine"]
    }
    dense = by["dense-fp16"]
    return {
        "vs": ratios,
        "attention_pe_utilisation": [dense["utilisation"]["attention_pe"], kvo["utilisation"]["attention_pe"]],
        "linear_dram_bw_utilisation": [dense["utilisation"]["linear_dram_bw"], kvo["utilisation"]["linear_dram_bw"]],
        "kv_read_reduction": 1 - kvo["kv_read_bytes_per_batch_step"] / dense["kv_read_bytes_per_batch_step"],
        "paper": {k: PAPER[k] for k in ("throughput_vs_baselines", "energy_efficiency_vs_baselines",
                                         "attention_pe_utilisation", "qkv_bandwidth_utilisation", "kv_ema_reduction")},
    }  # fmt: skip


def sweep(model: ModelConfig, name: str, contexts: list[int], batches: list[int]) -> list[dict[str, Any]]:
    """Tokens/s and energy per token of KVO-LLM and the fp16 dense baseline over context and batch."""
    rows = []
    for b in batches:
        for s in contexts:
            for machine in (kvo_llm(), baselines()[0]):
                r = machine_step(model, name, b, s, machine)
                rows.append({
                    "machine": machine.name, "batch_size": b, "context_len": s, "tokens_per_s": r.tokens_per_s,
                    "energy_mj_per_token": 1e3 * sum(r.energy_j().values()) / b,
                    "attention_pe": r.utilisation()["attention_pe"],
                })  # fmt: skip
    return rows


def plot(report: dict[str, Any], path: Path) -> None:
    """Stacked time and energy per op for each machine, utilisation per phase, and the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["machines"]
    names = [row["machine"] for row in rows]
    ops = sorted({op for row in rows for op in row["op_cycles"]})
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    for ax, key, unit, scale in (
        (axes[0][0], "op_cycles", "ms per step (one batch)", None),
        (axes[0][1], "op_energy_mj_per_token", "dynamic energy, mJ per token", 1.0),
    ):
        bottom = [0.0] * len(rows)
        for op in ops:
            values = [row[key].get(op, 0.0) for row in rows]
            if scale is None:
                values = [v / report["clock_hz"] * 1e3 for v in values]
            ax.barh(names, values, left=bottom, label=op)
            bottom = [a + v for a, v in zip(bottom, values, strict=True)]
        ax.set_xlabel(unit + (" (ops alone, before overlap)" if scale is None else ""))
        ax.invert_yaxis()
    axes[0][0].legend(fontsize=7, ncol=2)
    util = ["attention_pe", "attention_dram_bw", "linear_pe", "linear_dram_bw"]
    width = 0.8 / len(util)
    for i, key in enumerate(util):
        axes[1][0].bar([x + i * width for x in range(len(rows))], [row["utilisation"][key] for row in rows],
                       width, label=key)  # fmt: skip
    axes[1][0].set_xticks([x + 0.3 for x in range(len(rows))], names, rotation=30, ha="right", fontsize=7)
    axes[1][0].set_ylabel("utilisation per phase")
    axes[1][0].legend(fontsize=7)
    for machine in sorted({row["machine"] for row in report["sweep"]}):
        for b in sorted({row["batch_size"] for row in report["sweep"]}):
            pts = [r for r in report["sweep"] if r["machine"] == machine and r["batch_size"] == b]
            axes[1][1].plot([r["context_len"] for r in pts], [r["tokens_per_s"] for r in pts], marker="o",
                            label=f"{machine}, b={b}")  # fmt: skip
    axes[1][1].set_xscale("log", base=2)
    axes[1][1].set_xlabel("context tokens")
    axes[1][1].set_ylabel("tokens/s")
    axes[1][1].legend(fontsize=7)
    w = report["workload"]
    fig.suptitle(f"kvpr sim: {w['model']}, batch {w['batch_size']}, context {w['context_len']} (model, not measured)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(model: ModelConfig, name: str, b: int, s: int, contexts: list[int], batches: list[int],
                 kv_codec: str = "kvo") -> dict[str, Any]:  # fmt: skip
    rows = [result_row(machine_step(model, name, b, s, machine)) for machine in machines(kv_codec)]
    return {
        "workload": {"model": name, "batch_size": b, "context_len": s, "kv_codec": kv_codec},
        "clock_hz": kvo_llm().clock_hz,
        "peak": peak_row(kvo_llm()),
        "machines": rows,
        "headline": headline(rows),
        "sweep": sweep(model, name, contexts, batches),
    }
