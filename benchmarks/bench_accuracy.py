"""Accuracy against bytes per token: KVO beside the baselines, each at KVO's own budget.

For every context length the token budgets of H2O and StreamingLLM are set so they store as many
bytes per token as KVO does there (metadata and dense layers counted on both sides), and Quest's
read budget so a decode step reads as many bytes as KVO's. Then ``kvpr.eval.evaluate`` runs every
config on the same seeded essay windows and task items. Writes
``accuracy-<model>-<yyyymmdd>.{json,md,png}`` into ``--out``.

    python benchmarks/bench_accuracy.py --model smollm2-135m --context 1024 2048 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvpr.api import LLM  # noqa: E402
from kvpr.config import EngineConfig, RuntimeConfig  # noqa: E402
from kvpr.eval.budgets import matched_specs  # noqa: E402
from kvpr.eval.harness import cache_footprint, cache_for_spec, evaluate, write_report  # noqa: E402

# Fixed configs: the tokenwise host-tier codecs, and the compressors at their papers' settings
# (Quest's default 512-token read budget is about the tokens KVO attends: 48 chunks of 8 plus its
# recent window).
FIXED = ("none", "int8", "int4", "kivi2", "kvo", "quest")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--context", type=int, nargs="+", default=[1024])
    parser.add_argument("--items", type=int, default=10, help="items per task and context")
    parser.add_argument("--windows", type=int, default=4, help="perplexity windows per context")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--extra", nargs="*", default=[], help="more --codecs specs, e.g. kvo:k_diff_bits=4")
    parser.add_argument("--only", nargs="*", default=None, help="run only these config names")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--merge",
        default=None,
        help="an earlier report of this model: its rows are kept unless measured again (their byte counts "
        "recomputed by this checkout's formulas)",
    )
    args = parser.parse_args()

    llm = LLM(EngineConfig(model=args.model, runtime=RuntimeConfig(device=args.device, dtype=args.dtype)))
    earlier = json.loads(Path(args.merge).read_text())["rows"] if args.merge else []
    for row in earlier:  # byte counts are the formulas of this checkout (tests hold them to the runtime's)
        engine = llm.with_placement(cache_for_spec(row["codec"]))
        row["bytes_per_token"], row["read_bytes_per_token"] = cache_footprint(engine, row["context_len"])
    rows: list[dict[str, Any]] = []
    budgets: dict[int, dict[str, str]] = {}
    for context_len in args.context:
        budgets[context_len] = matched_specs(llm.model_config, context_len)
        specs = [*FIXED, *budgets[context_len].values(), *args.extra]
        if args.only is not None:
            specs = [spec for spec in specs if spec.partition(":")[0] in args.only or spec in args.only]
        print(f"context {context_len}: {', '.join(specs)}", flush=True)
        rows += evaluate(
            llm,
            [(spec, cache_for_spec(spec)) for spec in specs],
            [context_len],
            args.items,
            tasks=("passkey", "kv_retrieval", "multi_doc"),
            num_windows=args.windows,
            batch_size=args.batch_size,
        )
        stem = f"accuracy-{llm.name}-{datetime.date.today():%Y%m%d}"
        meta = {"matched_budgets": budgets, "device": args.device, "dtype": args.dtype, "merged_from": args.merge}
        measured = {(row["codec"], row["context_len"]) for row in rows}
        kept = [row for row in earlier if (row["codec"], row["context_len"]) not in measured]
        # after every context, so a cut run keeps its rows
        paths = write_report(kept + rows, args.out, llm.name, meta, stem=stem)
    for row in kept + rows:
        print(
            f"{row['codec']:>32} ctx={row['context_len']:5d} bytes/token={row['bytes_per_token']:8.0f} "
            f"read/token={row['read_bytes_per_token']:8.0f} ppl={row['ppl']:.3f} retrieval={row['retrieval_acc']:.2f}"
        )
    print("report:", *paths.values())
    return 0


if __name__ == "__main__":
    sys.exit(main())
