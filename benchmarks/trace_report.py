"""Where a decode step's time goes, read from a `kvpr bench --trace` file (Chrome trace, .json or .gz).

For every `kvpr.decode_step` span (the host issuing one step) the kernels and copies it launched are
found through their correlation ids; per stream it reports busy time and the idle time split into
*host-starved* (the next operation was launched only after the stream had gone idle: the host is
the bottleneck) and *waiting* (launched in time, held back by an event or the stream's queue).

    python benchmarks/trace_report.py trace.json.gz [--skip 1]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")


@dataclass
class StreamTime:
    """One stream's share of a step, microseconds."""

    busy: float = 0.0
    host_starved: float = 0.0
    waiting: float = 0.0
    ops: int = 0
    copy_bytes: float = 0.0
    by_name: collections.Counter = field(default_factory=collections.Counter)


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        trace = json.load(handle)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def step_report(events: list[dict], skip: int) -> tuple[list[float], dict[int, StreamTime], float]:
    """Host span of each step (ms), per-stream totals over the kept steps, and their GPU wall time (us)."""
    spans = (e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation")
    steps = sorted((e for e in spans if e.get("name") == "kvpr.decode_step"), key=lambda e: e["ts"])[skip:]
    if not steps:
        raise SystemExit("no kvpr.decode_step spans in this trace: record it with `kvpr bench --trace` of this version")
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }
    gpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]

    def step_of(op: dict) -> int | None:
        launch = launches.get(op["args"].get("correlation"))
        if launch is None:
            return None
        for index, step in enumerate(steps):
            if step["ts"] <= launch["ts"] <= step["ts"] + step["dur"]:
                return index
        return None

    per_stream: dict[int, StreamTime] = collections.defaultdict(StreamTime)
    gpu_wall = 0.0
    by_step: dict[int, list[dict]] = collections.defaultdict(list)
    for op in gpu_ops:
        index = step_of(op)
        if index is not None:
            by_step[index].append(op)
    for ops in by_step.values():
        gpu_wall += max(o["ts"] + o["dur"] for o in ops) - min(o["ts"] for o in ops)
        streams: dict[int, list[dict]] = collections.defaultdict(list)
        for op in ops:
            streams[op["args"].get("stream")].append(op)
        for stream, stream_ops in streams.items():
            totals = per_stream[stream]
            previous_end = None
            for op in sorted(stream_ops, key=lambda o: o["ts"]):
                totals.busy += op["dur"]
                totals.ops += 1
                totals.copy_bytes += op["args"].get("bytes", 0) if op["cat"] == "gpu_memcpy" else 0
                totals.by_name[op["name"][:70]] += op["dur"]
                if previous_end is not None and op["ts"] > previous_end:
                    gap = op["ts"] - previous_end
                    launched = launches[op["args"]["correlation"]]["ts"]
                    starved = min(gap, max(0.0, launched - previous_end))
                    totals.host_starved += starved
                    totals.waiting += gap - starved
                previous_end = max(previous_end or 0.0, op["ts"] + op["dur"])
    return [s["dur"] / 1e3 for s in steps], per_stream, gpu_wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--skip", type=int, default=1, help="first steps to leave out (warm-up)")
    parser.add_argument("--top", type=int, default=6, help="operations listed per stream")
    args = parser.parse_args()
    host_ms, per_stream, gpu_wall = step_report(load_events(args.trace), args.skip)
    n = len(host_ms)
    host, gpu = sum(host_ms) / n, gpu_wall / n / 1e3
    print(f"{args.trace.name}: {n} steps, host issue {host:.2f} ms/step, GPU span {gpu:.2f} ms/step")
    print("| stream | ops/step | busy ms | host-starved ms | waiting ms | copied MB/step |")
    print("|---|---|---|---|---|---|")
    for stream, t in sorted(per_stream.items(), key=lambda kv: -kv[1].busy):
        cells = (t.busy, t.host_starved, t.waiting)
        times = " | ".join(f"{c / n / 1e3:.2f}" for c in cells)
        print(f"| {stream} | {t.ops / n:.0f} | {times} | {t.copy_bytes / n / 1e6:.1f} |")
    for stream, t in sorted(per_stream.items(), key=lambda kv: -kv[1].busy):
        print(f"stream {stream}, top operations (ms/step):")
        for name, dur in t.by_name.most_common(args.top):
            print(f"  {dur / n / 1e3:8.3f}  {name}")


if __name__ == "__main__":
    main()
