"""Join latency result files of one device and day (runs split to fit the device's time limit)
into one JSON, markdown table and PNG chart.

    python benchmarks/merge_results.py OUT.json IN1.json IN2.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_latency import add_ratios, markdown, plot  # noqa: E402


def main() -> None:
    out, *inputs = (Path(arg) for arg in sys.argv[1:])
    parts = [json.loads(path.read_text()) for path in inputs]
    assert len({part["device"] for part in parts}) == 1, "results of different devices do not mix"
    rows = [row for part in parts for row in part["rows"]]
    for row in rows:
        row.pop("kvpr_auto_speedup", None)
    add_ratios(rows)
    merged = {
        "device": parts[0]["device"],
        "date": max(part["date"] for part in parts),
        "commit": ",".join(dict.fromkeys(part["commit"] for part in parts)),
        "torch": parts[0].get("torch"),
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
