"""KVO's ``encode_chunks`` alone: the torch path against the fused Triton encoder, one layer's shape.

Seeded inputs of the prefill's kinds (K float32, as ``decode_recent_k`` hands it over; V in the
model dtype; float32 scores), both encoders on the same inputs, every output checked equal first.
Each figure is the median of ``--repeats`` synchronised calls after a warm-up (the fused kernels
compile there); the fused encoder is timed at each ``--k-tiles`` choice, then each ``--v-tiles``
with the best K (``kvo_triton.Tiles``: channels and warps per program). Reports milliseconds per layer,
the speed-up, and the fused encoder's achieved bandwidth over the bytes it must move (K and V read
once, the encoded tensors written once); and the recent window's int8 K (``kvo.encode_recent``,
every prompt token at prefill) both ways, and ``encode_chunks_from_recent`` (the prefill's path: K
read in that int8 form) both ways. Writes ``kvo-encode-<config>-<device>-<yyyymmdd>.json``
into ``--out``; exits 1 if any output differs from the torch path's.

    # H200: opt-6.7b's layer at batch 16 x 2016 (1920 tokens finalised at prefill)
    $(python3 benchmarks/provenance.py) python3 benchmarks/bench_kvo_encode.py --device cuda \
        --tokens 1920 --batch-size 16 --heads 32 --head-dim 128 --out benchmarks/results
    # CPU smoke run (Triton's interpreter: tiny shapes only)
    TRITON_INTERPRET=1 python3 benchmarks/bench_kvo_encode.py --tokens 64 --batch-size 2 --heads 2 \
        --head-dim 64 --repeats 1 --allow-dirty
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_provenance_args, header_or_exit  # noqa: E402

from kvpr.compress import kvo_triton  # noqa: E402
from kvpr.compress.kvo import encode_chunks_from_recent, encode_chunks_torch, encode_recent  # noqa: E402
from kvpr.compress.kvo_config import KVOConfig
from kvpr.compress.quant import quantize_groups  # noqa: E402

CONFIGS = {"paper": KVOConfig(), "per_channel": KVOConfig(k_diff_axis="channel")}


def parse_pair(text: str) -> tuple[int, int]:
    """``CHANNELS:WARPS`` -> (channels, warps)."""
    channels, warps = (int(x) for x in text.split(":"))
    return channels, warps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compiles the kernels, fills the allocator's cache
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K float32 with outlier channels, V in ``--dtype``, scores [t, b, n_kv] float32, seeded."""
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.tokens, args.batch_size, args.heads, args.head_dim)
    k = torch.randn(shape, generator=gen, device=device)
    k = k * (1 + 4 * torch.rand(args.head_dim, generator=gen, device=device))
    v = torch.randn(shape, generator=gen, device=device).to(getattr(torch, args.dtype))
    return k, v, torch.rand(shape[:3], generator=gen, device=device)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    k, v, scores = inputs(args, device)
    want = encode_chunks_torch(k, v, scores, cfg)
    got = kvo_triton.encode_chunks_fused(k, v, scores, cfg)
    unequal = [name for name in want if not torch.equal(got[name], want[name])]
    torch_s = median_seconds(lambda: encode_chunks_torch(k, v, scores, cfg), device, args.repeats)

    def fused_seconds(tiles: kvo_triton.Tiles) -> float:
        out = kvo_triton.encode_chunks_fused(k, v, scores, cfg, tiles)  # every choice checked, too
        unequal.extend(f"{name} ({tiles})" for name in want if not torch.equal(out[name], want[name]))
        return median_seconds(
            functools.partial(kvo_triton.encode_chunks_fused, k, v, scores, cfg, tiles), device, args.repeats
        )

    # K's tiles with V's default, then V's with the best K's (each choice compiles once, in its warm-up)
    v_default = (kvo_triton.Tiles().v_channels, kvo_triton.Tiles().v_warps)
    k_s = {pair: fused_seconds(kvo_triton.Tiles(*pair, *v_default)) for pair in args.k_tiles}
    k_best = min(k_s, key=k_s.__getitem__)
    v_s = {pair: fused_seconds(kvo_triton.Tiles(*k_best, *pair)) for pair in args.v_tiles}
    best = kvo_triton.Tiles(*k_best, *min(v_s, key=v_s.__getitem__))
    best_s = min(v_s.values())
    # the recent window's K, as the prefill first stores every prompt token: model dtype, int8 groups
    recent = torch.cat([k, k[: args.recent_extra]]).to(v.dtype)  # [tokens + extra, b, n_kv, d]
    recent_equal = all(
        torch.equal(a, b)
        for a, b in zip(kvo_triton.quantize_recent_k(recent, cfg.group), quantize_groups(recent.float(), 8, cfg.group))
    )
    recent_torch_s = median_seconds(lambda: quantize_groups(recent.float(), 8, cfg.group), device, args.repeats)
    recent_fused_s = median_seconds(lambda: kvo_triton.quantize_recent_k(recent, cfg.group), device, args.repeats)
    # what the prefill runs: K from that int8 form (torch: decode_recent_k, then encode_chunks_torch)
    form = encode_recent(k, v, cfg, fused=False)
    from_int8 = {
        fused: functools.partial(encode_chunks_from_recent, form, v, scores, cfg, fused=fused)
        for fused in (False, True)
    }
    int8_want, int8_got = from_int8[False](), from_int8[True]()
    unequal.extend(f"{name} (from int8)" for name in int8_want if not torch.equal(int8_got[name], int8_want[name]))
    int8_s = {fused: median_seconds(fn, device, args.repeats) for fused, fn in from_int8.items()}
    moved = k.numel() * k.element_size() + v.numel() * v.element_size() + scores.numel() * 4
    moved += sum(x.numel() * x.element_size() for x in got.values())
    return {
        "config": args.config,
        "tokens": args.tokens,
        "batch_size": args.batch_size,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "k_dtype": "float32",
        "v_dtype": args.dtype,
        "repeats": args.repeats,
        "equal": not unequal,
        "unequal": unequal,
        "torch_ms": 1e3 * torch_s,
        "fused_ms_by_k_tiles": {f"K {c}ch x{w}w, V default": 1e3 * s for (c, w), s in k_s.items()},
        "fused_ms_by_v_tiles": {f"best K, V {c}ch x{w}w": 1e3 * s for (c, w), s in v_s.items()},
        "best_tiles": dataclasses.asdict(best),
        "fused_ms": 1e3 * best_s,
        "speedup": torch_s / best_s,
        "fused_bytes": moved,
        "fused_gb_per_s": moved / best_s / 1e9,
        "recent_tokens": recent.shape[0],
        "recent_equal": recent_equal,
        "recent_torch_ms": 1e3 * recent_torch_s,
        "recent_fused_ms": 1e3 * recent_fused_s,
        "from_int8_torch_ms": 1e3 * int8_s[False],
        "from_int8_fused_ms": 1e3 * int8_s[True],
    }


def table(r: dict[str, Any]) -> str:
    lines = [
        f"KVO encode_chunks ({r['config']}), {r['tokens']} tokens x batch {r['batch_size']} x {r['heads']} heads "
        f"x d {r['head_dim']}, K float32, V {r['v_dtype']}, median of {r['repeats']}",
        f"outputs equal: {r['equal']}" + (f" (differ: {', '.join(r['unequal'])})" if r["unequal"] else ""),
        f"{'torch':<32}{r['torch_ms']:>10.3f} ms",
    ]
    timed = r["fused_ms_by_k_tiles"] | r["fused_ms_by_v_tiles"]
    lines += [f"{'fused, ' + name:<32}{ms:>10.3f} ms" for name, ms in timed.items()]
    lines.append(f"best tiles {r['best_tiles']}: {r['fused_ms']:.3f} ms")
    lines.append(
        f"speed-up {r['speedup']:.1f}x; fused moves {r['fused_bytes'] / 1e9:.3f} GB at {r['fused_gb_per_s']:.0f} GB/s"
    )
    lines.append(
        f"recent-window K ({r['recent_tokens']} tokens, int8): torch {r['recent_torch_ms']:.3f} ms, "
        f"fused {r['recent_fused_ms']:.3f} ms, equal: {r['recent_equal']}"
    )
    lines.append(
        f"prefill's path, K from the int8 form (default tiles): torch {r['from_int8_torch_ms']:.3f} ms, "
        f"fused {r['from_int8_fused_ms']:.3f} ms"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=1920, help="finalised tokens (a multiple of the group)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32, help="KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float16", help="V's dtype (the model's)")
    parser.add_argument("--config", default="paper", choices=sorted(CONFIGS))
    k_tiles, v_tiles = [(32, 1), (32, 2), (64, 2), (128, 4), (128, 8)], [(16, 1), (32, 1), (32, 2), (128, 4)]
    parser.add_argument("--k-tiles", type=parse_pair, nargs="+", default=k_tiles, help="K's CHANNELS:WARPS to time")
    parser.add_argument("--v-tiles", type=parse_pair, nargs="+", default=v_tiles, help="V's, with the best K's")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--recent-extra", type=int, default=96, help="recent-window tokens beyond --tokens (2016)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    add_provenance_args(parser)
    args = parser.parse_args()
    header = header_or_exit(args.allow_dirty)
    result = measure(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        device = header["device"].replace(" ", "_")
        path = args.out / f"kvo-encode-{args.config}-{device}-{header['date']}.json"
        path.write_text(json.dumps({**header, **result}, indent=2) + "\n")
        print(f"wrote {path}")
    print(table(result))
    return 0 if result["equal"] and result["recent_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
