"""Decode attention over a GPU-resident cache: SDPA in one piece against the split-KV Triton kernel.

One new query per row over ``s`` cached tokens is bound by reading K and V once. SDPA's kernels
parallelise over (row, head, query block); with one query per row (GQA folds the group into a few
rows) that is ``b * n_kv`` programs each walking the whole context, too few to fill the GPU at long
context and small batch. The split-KV kernel of ``kvpr.runtime.split_attention`` also splits the
context and merges the partials exactly. Both run on the same seeded inputs (outputs checked equal
within fp16 bounds first); each figure is the median of ``--repeats`` CUDA-event timings after a
warm-up, with the bandwidth it achieves over the K,V bytes it must read. Writes
``decode-attention-<device>-<yyyymmdd>.json`` into ``--out``.

    $(python3 benchmarks/provenance.py) python3 benchmarks/bench_decode_attention.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_provenance_args, header_or_exit  # noqa: E402

from kvpr.models.common import attend, attention_bias  # noqa: E402
from kvpr.runtime.split_attention import Partials, attend_piece  # noqa: E402

# (label, batch, query heads, KV heads, context, head dim): the decode shapes of the latency tables
SHAPES = (
    ("llama-3-8b 8 x 8K", 8, 32, 8, 8192, 128),
    ("llama-3.1-8b 4 x 32K", 4, 32, 8, 32768, 128),
    ("opt-6.7b 16 x 2K", 16, 32, 32, 2032, 128),
    ("opt-6.7b 32 x 288", 32, 32, 32, 288, 128),
)


def timed_ms(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls (CUDA events), after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def one_shape(b: int, n_q: int, n_kv: int, s: int, d: int, repeats: int) -> dict[str, Any]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, n_q, 1, d, device="cuda", dtype=torch.float16, generator=generator)
    k = torch.randn(s, b, n_kv, d, device="cuda", dtype=torch.float16, generator=generator)  # token-major tier
    v = torch.randn(s, b, n_kv, d, device="cuda", dtype=torch.float16, generator=generator)
    valid = torch.ones(b, s, dtype=torch.bool, device="cuda")
    valid[0, : s // 4] = False  # a left-padded row
    bias = attention_bias(valid[:, None, None, :], torch.float16)  # [b, 1, 1, s]
    partials = Partials()
    query = q[:, :, 0].contiguous()  # [b, n_q, d]

    def sdpa() -> torch.Tensor:
        return attend(q, k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), bias)

    def split() -> torch.Tensor:
        partials.reset()
        attend_piece(query, k, v, valid, partials)
        return partials.merge(torch.float16)

    error = (sdpa().float() - split().float()).abs().max().item()
    if error > 2e-2:
        raise SystemExit(f"split-KV attention differs from SDPA by {error:.3g} at b={b} s={s}")
    kv_bytes = 2 * s * b * n_kv * d * 2
    row: dict[str, Any] = {
        "batch_size": b,
        "q_heads": n_q,
        "kv_heads": n_kv,
        "context": s,
        "head_dim": d,
        "kv_bytes": kv_bytes,
        "max_abs_difference": error,
    }
    for name, fn in (("sdpa", sdpa), ("split_kv", split)):
        runs = timed_ms(fn, repeats)
        median = statistics.median(runs)
        row[name] = {"ms": median, "ms_min": min(runs), "ms_max": max(runs), "gb_per_s": kv_bytes / median / 1e6}
    row["speedup"] = row["sdpa"]["ms"] / row["split_kv"]["ms"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    add_provenance_args(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode_attention needs a CUDA device (the kernels it compares are CUDA kernels)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = header_or_exit(args.allow_dirty)
    result["rows"] = []
    print(f"{'shape':<22}{'KV MB':>8}{'sdpa ms':>9}{'GB/s':>7}{'split ms':>10}{'GB/s':>7}{'x':>6}")
    with torch.inference_mode():
        for label, *shape in SHAPES:
            row = {"label": label, **one_shape(*shape, repeats=args.repeats)}
            result["rows"].append(row)
            sdpa, split = row["sdpa"], row["split_kv"]
            print(
                f"{label:<22}{row['kv_bytes'] / 1e6:>8.0f}{sdpa['ms']:>9.3f}{sdpa['gb_per_s']:>7.0f}"
                f"{split['ms']:>10.3f}{split['gb_per_s']:>7.0f}{row['speedup']:>6.2f}"
            )
    device = torch.cuda.get_device_name().replace(" ", "_")
    path = args.out / f"decode-attention-{device}-{result['date']}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
