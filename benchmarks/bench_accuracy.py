"""Accuracy against bytes per token: KVO beside the baselines, each at KVO's own budget.

For every context length the token budgets of H2O and StreamingLLM are set so they store as many
bytes per token as KVO does there (metadata and dense layers counted on both sides), and Quest's
read budget so a decode step reads as many bytes as KVO's. Then ``kvpr.eval.evaluate`` runs every
config on the same seeded essay windows and task items, under the protocol of ``kvpr.eval.harness``
(contexts compressed first, questions and answers through the compressed cache). Writes
``<tag>-<model>-<device>-<yyyymmdd>.{json,md,png}`` into ``--out`` after every config, so a run cut
short keeps what it measured.

    python benchmarks/bench_accuracy.py --context 1024 2048 4096 --items 100 --out benchmarks/results
    python benchmarks/bench_accuracy.py --device cuda --dtype float16 --compile kvo ...   # the timed path
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_provenance_args, header_or_exit  # noqa: E402

from kvpr.api import LLM  # noqa: E402
from kvpr.config import CacheConfig, EngineConfig, RuntimeConfig  # noqa: E402
from kvpr.eval.budgets import matched_specs  # noqa: E402
from kvpr.eval.harness import cache_for_spec, evaluate, guard_tokens, write_report  # noqa: E402
from kvpr.eval.hf_runner import QUANTO_PEERS, quanto_available  # noqa: E402
from kvpr.eval.tasks import TASK_NAMES  # noqa: E402

# Fixed configs: the tokenwise host-tier codecs, the compressors at their papers' settings (Quest's
# default 512-token read budget is about the tokens KVO attends: 48 chunks of 8 plus its recent
# window), and transformers' QuantizedCache with optimum-quanto at 4 and 2 bits (the peers).
FIXED = ("none", "int8", "int4", "kivi2", "kvo", "quest", *QUANTO_PEERS)
COMPILED = "+compile"  # suffix of a config measured with --compile (KVO's fused decode, CUDA)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the built-in SmolLM2-135M-Instruct")
    parser.add_argument("--name", default=None, help="the model's name in the report (default: the engine's)")
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--items", type=int, default=100, help="items per task family and context length")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows per context length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--extra", nargs="*", default=[], help="more --codecs specs, e.g. kvo:k_diff_bits=4")
    parser.add_argument("--only", nargs="*", default=None, help="run only these config names (or method names)")
    parser.add_argument("--compile", nargs="*", default=[], help="configs also measured with --compile (CUDA)")
    parser.add_argument(
        "--by-config", action="store_true", help="all contexts of a config before the next (default: by context)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guard",
        type=int,
        default=None,
        help="W: keep needles out of the last W tokens (default: the run's largest window)",
    )
    parser.add_argument("--tag", default="accuracy")
    parser.add_argument("--out", default="benchmarks/results")
    add_provenance_args(parser)
    args = parser.parse_args()
    header = header_or_exit(args.allow_dirty)  # before the model loads: a refusal costs nothing

    llm = LLM(EngineConfig(model=args.model, runtime=RuntimeConfig(device=args.device, dtype=args.dtype)))
    budgets = {context_len: matched_specs(llm.model_config, context_len) for context_len in args.context}
    plan: list[tuple[int, str, CacheConfig, bool]] = []  # (context, name, cache, compiled)
    for context_len in args.context:
        specs = [*FIXED, *budgets[context_len].values(), *args.extra]
        if args.only is not None:  # in the order --only names them
            rank = {name: at for at, name in enumerate(args.only)}
            specs = [spec for spec in specs if spec.partition(":")[0] in rank or spec in rank]
            specs.sort(key=lambda spec: rank.get(spec, rank.get(spec.partition(":")[0])))
        if not quanto_available():
            skipped = [spec for spec in specs if spec in QUANTO_PEERS]
            if skipped:
                print(f"skipping {skipped}: pip install optimum-quanto==0.2.7 to measure them", flush=True)
            specs = [spec for spec in specs if spec not in QUANTO_PEERS]
        for spec in specs:
            plan.append((context_len, spec, cache_for_spec(spec), False))
            if spec in args.compile:
                plan.append((context_len, spec + COMPILED, cache_for_spec(spec), True))
    if args.by_config:  # a run cut short then has whole configs rather than whole context lengths
        first: dict[str, int] = {}  # a config's family (matched budgets differ by context) -> first place
        for rank, (_, name, _, _) in enumerate(plan):
            first.setdefault(name.partition(":")[0], rank)
        plan.sort(key=lambda entry: first[entry[1].partition(":")[0]])
    # One W per context length (the matched budgets grow with it), so every config sees the same items there.
    # --guard fixes W, so runs of different configs (or --only subsets) see the same items.
    guards = {
        length: args.guard
        if args.guard is not None
        else guard_tokens([(name, cache) for context_len, name, cache, _ in plan if context_len == length])
        for length in args.context
    }
    device = llm.device.type if llm.device.type == "cpu" else llm.device.type + "-" + _gpu_name(llm)
    model_name = args.name or Path(llm.name).name
    stem = f"{args.tag}-{model_name}-{device}-{datetime.date.today():%Y%m%d}"
    meta = {**header, "matched_budgets": budgets, "dtype": args.dtype, "guard_tokens": guards}
    print(f"{len(plan)} configs, needles kept out of the last {guards} tokens: {[p[1] for p in plan]}", flush=True)
    rows: list[dict[str, Any]] = []
    for context_len, name, cache, compiled in plan:
        runtime = dataclasses.replace(llm.config.runtime, compile=compiled)
        engine = llm.with_placement(cache, runtime)
        rows += evaluate(
            engine,
            [(name, cache)],
            [context_len],
            args.items,
            args.seed,
            tasks=tuple(args.tasks),
            num_windows=args.windows,
            batch_size=args.batch_size,
            guard=guards[context_len],
        )
        paths = write_report(rows, args.out, model_name, meta, stem=stem)  # after every config
        row = rows[-1]
        print(
            f"{name:>36} ctx={context_len:5d} bytes/token={row['bytes_per_token']:8.0f} "
            f"ppl={_num(row['ppl'])} {_span(row['ppl_ci'])} retrieval={_num(row['retrieval_acc'])} "
            f"{_span(row['retrieval_ci'])}",
            flush=True,
        )
    print("report:", *paths.values())
    return 0


def _gpu_name(llm: LLM) -> str:
    import torch

    return torch.cuda.get_device_name(llm.device).replace(" ", "_")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _span(interval: list[float] | None) -> str:
    return "" if not interval else f"[{interval[0]:.3f}, {interval[1]:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
