"""Throughput mode side by side with FlexGen 0.1.8 on one GPU, in one run.

Each run of a (workload, system) is its own process, so pinned host memory is returned between them
and one run's allocator state cannot help or hurt the next; every figure is the median of
``--repeats`` such runs, with min, max and the raw values. Systems:

    flexgen            FlexGen's own code (benchmarks/bench_flexgen.py), dummy weights
    kvpr-off           kvpr's block schedule, the same placement and batches, no recomputation
    kvpr               the same placement and batches with partial recomputation (--kv-partial)
    kvpr-auto-policy   kvpr with the policy its search picks for this machine (--policy auto)

Throughput is FlexGen's figure: generated tokens / (prefill + decode) for one block. FlexGen is
warmed up at the timed shape (``bench_flexgen.py``), as kvpr is. Writes
``throughput-<device>-<yyyymmdd>.json`` (provenance header with FlexGen's version, rows), a markdown
table and a PNG; refuses a dirty tree unless ``--allow-dirty`` (see ``provenance.py``).

    python3 benchmarks/bench_throughput.py --suite paper --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provenance import add_provenance_args, header_or_exit
from spread import aggregate

HERE = Path(__file__).resolve().parent
TIMED = ("tokens_per_s", "prefill_s", "decode_tokens_per_s")  # medians with min, max and runs


@dataclass(frozen=True)
class Workload:
    model: str  # kvpr's built-in name; FlexGen gets facebook/<model>
    prompt_len: int
    gen_len: int
    percent: tuple[int, ...]
    gpu_batch_size: int
    num_gpu_batches: int
    systems: tuple[str, ...] = ("flexgen", "kvpr-off", "kvpr", "kvpr-auto-policy")
    note: str = ""
    compress: bool = False  # FlexGen --compress-weight --compress-cache; kvpr --compress-weight --kv-codec int4

    @property
    def name(self) -> str:
        suffix = " 4-bit" if self.compress else ""
        return f"{self.model} {self.prompt_len}+{self.gen_len} {self.gpu_batch_size}x{self.num_gpu_batches}{suffix}"


# The workloads; placements are FlexGen's flags for them.
SUITES: dict[str, list[Workload]] = {
    "paper": [
        Workload("opt-6.7b", 256, 32, (0, 100, 0, 100, 0, 100), 32, 8, note="the paper's flags"),
        Workload("opt-6.7b", 256, 32, (0, 100, 0, 100, 0, 100), 32, 1, systems=("flexgen", "kvpr-off", "kvpr")),
    ],
    "large": [
        Workload("opt-13b", 256, 32, (0, 100, 0, 100, 0, 100), 32, 4, systems=("flexgen", "kvpr")),
        Workload("opt-30b", 256, 32, (0, 100, 0, 100, 0, 100), 32, 2, systems=("flexgen", "kvpr")),
    ],
    # OPT has 2048 learned positions: 1984 + 64 fills them (FlexGen's own prompt is mostly padding,
    # which would let it run 2048 + 64; both systems get the same 1984 + 64 here).
    "long": [
        Workload(
            "opt-6.7b",
            1984,
            64,
            (100, 0, 0, 100, 100, 0),
            16,
            1,
            systems=("flexgen", "kvpr", "kvpr-auto-policy"),
            note="weights on GPU, cache on CPU",
        ),
    ],
    # issue 14 item 4: 4-bit weights and cache on both sides (not yet run on a GPU)
    "compressed": [
        Workload("opt-30b", 256, 32, (0, 100, 0, 100, 0, 100), 32, 2, systems=("flexgen", "kvpr"), compress=True),
        Workload(
            "opt-30b",
            256,
            32,
            (0, 100, 0, 100, 0, 100),
            32,
            8,
            systems=("flexgen", "kvpr", "kvpr-auto-policy"),
            compress=True,
            note="a larger block: the cache is 4-bit",
        ),  # fmt: skip
    ],
    "smoke": [
        Workload("opt-125m", 64, 8, (0, 100, 0, 100, 0, 100), 4, 2, systems=("kvpr-off", "kvpr", "kvpr-auto-policy")),
    ],
}


@dataclass
class Runner:
    host_memory_gib: float
    offload_dir: str
    timeout_s: float
    failures: list[str] = field(default_factory=list)

    def run(self, workload: Workload, system: str) -> dict[str, Any] | None:
        os.makedirs(self.offload_dir, exist_ok=True)
        command = self._command(workload, system)
        print(f"== {workload.name} {system}: {' '.join(command[1:])}", flush=True)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout_s, env=os.environ)
        except subprocess.TimeoutExpired:
            self.failures.append(f"{workload.name} {system}: timed out after {self.timeout_s:.0f} s")
            return None
        sys.stderr.write(done.stderr[-3000:])
        if done.returncode != 0:
            self.failures.append(f"{workload.name} {system}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
            return None
        text = Path(self._flexgen_json).read_text() if system == "flexgen" else done.stdout
        return self._row(workload, system, json.loads(text[text.index("{") :]))

    @property
    def _flexgen_json(self) -> str:
        return os.path.join(self.offload_dir, "flexgen-result.json")

    def _command(self, w: Workload, system: str) -> list[str]:
        percent = [str(p) for p in w.percent]
        shape = ["--gpu-batch-size", str(w.gpu_batch_size), "--num-gpu-batches", str(w.num_gpu_batches)]
        lengths = ["--prompt-len", str(w.prompt_len), "--gen-len", str(w.gen_len)]
        if system == "flexgen":
            flexgen = [sys.executable, str(HERE / "bench_flexgen.py"), "--model", f"facebook/{w.model}"]
            compress = ["--compress-weight", "--compress-cache"] if w.compress else []
            return [*flexgen, "--percent", *percent, *shape, *lengths, "--offload-dir", self.offload_dir,
                    *compress, "--json", self._flexgen_json]  # fmt: skip
        kvpr = [sys.executable, "-m", "kvpr", "bench", "--model", w.model, "--dummy-weights", "--mode", "throughput",
                *lengths, "--host-memory-gib", str(self.host_memory_gib), "--offload-dir", self.offload_dir,
                "--json", *(["--compress-weight", "--kv-codec", "int4"] if w.compress else [])]  # fmt: skip
        if system == "kvpr-auto-policy":
            return [*kvpr, "--policy", "auto", "--kv-partial"]
        recompute = ["--recompute", "off"] if system == "kvpr-off" else ["--kv-partial"]
        return [*kvpr, "--percent", *percent, *shape, *recompute]

    @staticmethod
    def _row(w: Workload, system: str, result: dict[str, Any]) -> dict[str, Any]:
        peer: dict[str, Any] = {}
        if system == "flexgen":
            policy = result["policy"]
            tokens_per_s = result["tokens_per_s"]
            prefill_s, recompute = result.get("prefill_s"), 0.0
            peer = {"flexgen_version": result.get("flexgen_version"), "warmup": result.get("warmup")}
        else:
            policy = result["policy"]
            tokens_per_s = result["generation_tokens_per_s"]
            prefill_s = result["prefill_s"]
            lens, context = result.get("recompute_lens") or [0], w.prompt_len + w.gen_len
            recompute = max(lens) / context if context else 0.0
        return {
            "model": w.model,
            "prompt_len": w.prompt_len,
            "gen_len": w.gen_len,
            "system": system,
            "policy": policy,
            "tokens_per_s": tokens_per_s,
            "prefill_s": prefill_s,
            "decode_tokens_per_s": result.get("decode_tokens_per_s", result.get("tokens_per_s")),
            "recompute_fraction_max": recompute,
            "note": w.note,
            **peer,
        }

    def repeated(self, workload: Workload, system: str, repeats: int) -> dict[str, Any] | None:
        """``repeats`` runs, each its own process; None if any failed (the failure is recorded)."""
        runs = []
        for _ in range(repeats):
            row = self.run(workload, system)
            if row is None:
                return None
            runs.append(row)
        return aggregate(runs, TIMED)


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's throughput over FlexGen's on the same workload (same effective batch)."""
    for row in rows:
        peer = next(
            (r for r in rows if r["system"] == "flexgen" and _same_workload(r, row) and _same_block(r, row)), None
        )
        peer = peer or next((r for r in rows if r["system"] == "flexgen" and _same_workload(r, row)), None)
        row["vs_flexgen"] = row["tokens_per_s"] / peer["tokens_per_s"] if peer else None


def _same_workload(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a[k] == b[k] for k in ("model", "prompt_len", "gen_len"))


def _same_block(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a["policy"].get(k) == b["policy"].get(k) for k in ("gpu_batch_size", "num_gpu_batches"))


def _policy_text(policy: dict[str, Any]) -> str:
    percent = " ".join(f"{p:g}" for p in policy["percent"])
    return f"{percent} / {policy['gpu_batch_size']}x{policy['num_gpu_batches']}"


def _ranged(row: dict[str, Any], key: str, f: str) -> str:
    if row.get(key) is None:
        return ""
    if row.get(f"{key}_min") is None:
        return format(row[key], f)
    return f"{row[key]:{f}} [{row[f'{key}_min']:{f}}-{row[f'{key}_max']:{f}}]"


def write_report(rows: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> dict[str, Path]:
    stem = f"throughput-{meta['device'].replace(' ', '_')}-{meta['date'].replace('-', '')}"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"Throughput mode on {meta['device']} ({meta['date']}, commit {meta['commit'][:10]}), dummy weights, fp16.",
        "tokens/s = generated tokens / (prefill + decode) of one block, as FlexGen reports it; "
        f"medians [min-max] of {meta['repeats']} runs, each its own process.",
        "",
        "| model | prompt+gen | system | policy (--percent / gbs x ngb) | max l/s | prefill s | tokens/s "
        "| vs FlexGen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "" if r["vs_flexgen"] is None else f"{r['vs_flexgen']:.2f}x"
        lines.append(
            f"| {r['model']} | {r['prompt_len']}+{r['gen_len']} | {r['system']} | {_policy_text(r['policy'])} | "
            f"{r['recompute_fraction_max']:.2f} | {_ranged(r, 'prefill_s', '.2f')} | "
            f"{_ranged(r, 'tokens_per_s', '.1f')} | {ratio} |"
        )
    paths["markdown"].write_text("\n".join(lines) + "\n")
    _plot(rows, meta, paths["png"])
    return paths


def _plot(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        block = f"{r['policy']['gpu_batch_size']}x{r['policy']['num_gpu_batches']}"
        block = "auto" if r["system"] == "kvpr-auto-policy" else block
        key = f"{r['model']}\n{r['prompt_len']}+{r['gen_len']} {block}"
        groups.setdefault(key, []).append(r)
    systems = ["flexgen", "kvpr-off", "kvpr", "kvpr-auto-policy"]
    colors = {"flexgen": "#888888", "kvpr-off": "#9ecae1", "kvpr": "#3182bd", "kvpr-auto-policy": "#08519c"}
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    width = 0.2
    for i, system in enumerate(systems):
        xs, ys = [], []
        for g, members in enumerate(groups.values()):
            match = [r for r in members if r["system"] == system]
            if match:
                xs.append(g + (i - 1.5) * width)
                ys.append(match[0]["tokens_per_s"])
        if xs:
            ax.bar(xs, ys, width, label=system, color=colors[system])
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel("generated tokens/s")
    flexgen = (meta.get("peers") or {}).get("flexgen") or "?"
    ax.set_title(f"Throughput mode vs FlexGen {flexgen} ({meta['device']}), medians", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", nargs="+", default=["paper"], choices=sorted(SUITES))
    parser.add_argument("--systems", nargs="+", default=None, help="run only these systems")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--repeats", type=int, default=3, help="runs (processes) per figure: median, min, max")
    parser.add_argument("--host-memory-gib", type=float, default=100.0)
    parser.add_argument("--offload-dir", default="/tmp/kvpr-offload")
    parser.add_argument("--timeout-s", type=float, default=400.0)
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    meta = {**header_or_exit(args.allow_dirty, peers=("flexgen",)), "repeats": args.repeats}
    runner = Runner(args.host_memory_gib, args.offload_dir, args.timeout_s)
    rows: list[dict[str, Any]] = []
    for suite in args.suite:
        for workload in SUITES[suite]:
            for system in workload.systems:
                if args.systems and system not in args.systems:
                    continue
                row = runner.repeated(workload, system, args.repeats)
                if row is not None:
                    rows.append(row)
                    print(f"   {row['tokens_per_s']:.1f} tokens/s", flush=True)
                    _ratios(rows)
                    paths = write_report(rows, meta, Path(args.out))  # after every row: a cut-off run keeps them
    if rows:
        print(paths["markdown"].read_text())
    for failure in runner.failures:
        print(f"FAILED: {failure}")
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
