"""``kvpr sim``: the accelerator model on one workload (JSON and PNG), its sweep, and the H200 validation.

``--results`` writes the committed results files (``sim-kvo-<date>.json`` with its PNG, and
``sim-validation-NVIDIA_H200-<date>.json``) under benchmarks/results/ with the provenance header of
benchmarks/provenance.py, refusing a dirty tree as the benchmarks do.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvpr.errors import KvprError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
DEFAULT_BATCHES = [8, 16, 32]


def register_sim(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add ``kvpr sim`` through the CLI's ``command(name, help)``."""
    sim = command("sim", "model the KVO-LLM accelerator on kvpr's KVO traffic; validate the model on the H200")
    sim.add_argument("--model", default="llama-2-7b", help="a built-in model configuration (kvpr's registry)")
    sim.add_argument("--batch-size", type=int, default=16, help="sequences decoded together")
    sim.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    sim.add_argument("--kv-codec", default="kvo", choices=["kvo", "int4", "int8", "fp16"], help="the accelerator's K,V")
    sim.add_argument("--sweep-context", type=int, nargs="+", default=DEFAULT_CONTEXTS, help="contexts of the sweep")
    sim.add_argument("--sweep-batch", type=int, nargs="+", default=DEFAULT_BATCHES, help="batches of the sweep")
    sim.add_argument("--out", default=None, help="write the report as OUT.json and OUT.png")
    sim.add_argument("--validate", action="store_true", help="also predict the committed H200 decode rows")
    sim.add_argument("--results", action="store_true", help="write the committed results files (clean tree only)")
    sim.add_argument("--allow-dirty", action="store_true", help="with --results: write from a dirty tree (recorded)")
    sim.add_argument("--json", action="store_true", help="print the whole report as JSON")


def _header(allow_dirty: bool) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from provenance import ProvenanceError, results_header
    except ImportError:
        raise KvprError("--results needs kvpr's source checkout (benchmarks/provenance.py)") from None
    try:
        return results_header(allow_dirty)
    except ProvenanceError as problem:
        raise KvprError(f"refused: {problem}") from None


def _table(report: dict[str, Any]) -> str:
    lines = [f"{'machine':26s} {'tok/s':>9s} {'step ms':>9s} {'mJ/token':>9s} {'att PE':>7s} {'lin BW':>7s}"]
    for row in report["machines"]:
        u = row["utilisation"]
        lines.append(
            f"{row['machine']:26s} {row['tokens_per_s']:9.1f} {row['step_ms']:9.2f} "
            f"{row['energy_mj_per_token_total']:9.2f} {u['attention_pe']:7.1%} {u['linear_dram_bw']:7.1%}"
        )
    peak = report["peak"]
    lines.append(
        f"peak {peak['peak_gops']:.0f} GOPS ({peak['peak_gops_error']:+.1%} vs {peak['paper_peak_gops']:.0f}), "
        f"{peak['gops_per_w']:.0f} GOPS/W ({peak['gops_per_w_error']:+.1%} vs {peak['paper_gops_per_w']:.0f})"
    )
    return "\n".join(lines)


def _validation_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'workload':55s} {'predicted':>9s} {'measured':>9s} {'error':>7s}"]
    lines += [f"{r['workload']:55s} {r['predicted_ms']:9.1f} {r['measured_ms']:9.1f} {r['error']:+7.1%}" for r in rows]
    return "\n".join(lines)


def run_sim(args: argparse.Namespace) -> int:
    from kvpr.models.registry import builtin_config
    from kvpr.sim.report import build_report, plot

    if args.batch_size < 1 or args.context < 0 or min(args.sweep_batch) < 1 or min(args.sweep_context) < 0:
        raise KvprError("--batch-size and --sweep-batch must be >= 1, contexts >= 0")
    header = _header(args.allow_dirty) if args.results else None
    model = builtin_config(args.model)
    report = build_report(
        model, args.model, args.batch_size, args.context, args.sweep_context, args.sweep_batch, args.kv_codec
    )
    validation = None
    if args.validate or args.results:
        from kvpr.sim.validation import TOLERANCE, HostModel, host_summary, validation_rows

        host = HostModel.count(REPO)
        validation = validation_rows(REPO, host)
    if args.json:
        print(json.dumps({"report": report, "validation": validation}, indent=1))
    else:
        print(_table(report))
        if validation is not None:
            print(_validation_table(validation))
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=1))
        plot(report, Path(args.out).with_suffix(".png"))
    if header is not None and validation is not None:
        results = REPO / "benchmarks" / "results"
        base = results / f"sim-kvo-{header['date']}"
        base.with_suffix(".json").write_text(json.dumps({**header, **report}, indent=1) + "\n")
        plot(report, base.with_suffix(".png"))
        within = sum(row["within_tolerance"] for row in validation)
        summary = {"tolerance": TOLERANCE, "within_tolerance": within, "rows_total": len(validation),
                   "host_model": host_summary(host)}  # fmt: skip
        path = results / f"sim-validation-NVIDIA_H200-{header['date']}.json"
        path.write_text(json.dumps({**header, **summary, "rows": validation}, indent=1) + "\n")
        print(f"wrote {base.with_suffix('.json').name}, {base.with_suffix('.png').name}, {path.name}")
    return 0
