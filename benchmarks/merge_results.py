"""Join latency result files of one device (runs split to fit the device's time limit) into one JSON,
markdown table and PNG chart. Provenance is kept, not smoothed over: the commits of all parts are
listed, the result is dirty if any part was, and parts of different torch or driver versions are
refused.

    python benchmarks/merge_results.py OUT.json IN1.json IN2.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import add_ratios, markdown, plot  # noqa: E402

SAME = ("device", "driver", "torch", "transformers", "python", "repeats")  # what the parts must share


def main() -> None:
    out, *inputs = (Path(arg) for arg in sys.argv[1:])
    parts = [json.loads(path.read_text()) for path in inputs]
    for key in SAME:
        values = {json.dumps(part.get(key)) for part in parts}
        assert len(values) == 1, f"results with different {key} ({', '.join(sorted(values))}) do not mix"
    rows = [row for part in parts for row in part["rows"]]
    for row in rows:
        for ratio in ("kvpr_auto_speedup", "speedup_vs_kvpr_off", "vs_floor"):
            row.pop(ratio, None)
    add_ratios(rows)
    dirty = [part.get("dirty") for part in parts]
    merged = {
        **{key: parts[0].get(key) for key in (*SAME, "cuda", "peers")},
        "date": max(part["date"] for part in parts),
        "commit": ",".join(dict.fromkeys(part["commit"] for part in parts)),
        "dirty": True if any(dirty) else None if None in dirty else False,
        "allow_dirty": any(part.get("allow_dirty") for part in parts),
        "bandwidth_h2d_gbps": max(part.get("bandwidth_h2d_gbps") or 0.0 for part in parts),
        "sources": [path.name for path in inputs],
        "rows": rows,
    }
    out.write_text(json.dumps(merged, indent=1))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows))


if __name__ == "__main__":
    main()
