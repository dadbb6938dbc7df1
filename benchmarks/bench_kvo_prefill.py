"""KVO prefill against dense prefill, with the KVO work split into its phases (issue 14 item 2).

The same seeded prompts and the same dummy weights for both: dense is ``--kv-codec none`` with the
cache on the compute device, KVO is ``--kv-codec kvo`` (``LLM.with_placement``, no reload). Each timed
figure is the median of ``--repeats`` prefills, each on a fresh executor after one warm-up of each;
CUDA work is synchronised before the clock stops. A separate run then times the KVO phases (each
wrapped with device synchronisation, so their sum is a little above the overhead of a plain run).
Writes ``kvo-prefill-<model>-<device>-<yyyymmdd>.json`` into ``--out`` and prints a table last.

    # CPU, small (opt-125m shapes, 4 layers, random weights)
    python3 benchmarks/bench_kvo_prefill.py --allow-dirty
    # CPU, the profiled size
    python3 benchmarks/bench_kvo_prefill.py --model opt-125m --batch-size 4 --prompt-len 1024 --threads 1 --allow-dirty
    # H200: the issue's size
    $(python3 benchmarks/provenance.py) python3 benchmarks/bench_kvo_prefill.py --model opt-6.7b \
        --batch-size 16 --prompt-len 2016 --device cuda --dtype float16 --repeats 5 --out benchmarks/results

``--encoder torch`` keeps ``encode_chunks_from_recent`` and ``encode_recent`` on their torch paths (the fused
Triton kernels are the default where they run), so one device call can time both: the result's file
name then says which.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import add_provenance_args, header_or_exit  # noqa: E402

import kvpr.runtime.compressed as compressed  # noqa: E402
import kvpr.runtime.kvo_cache as kvo_cache  # noqa: E402
from kvpr.api import LLM  # noqa: E402
from kvpr.cache.rows import RowLayout, RowTier  # noqa: E402
from kvpr.config import CacheConfig, EngineConfig, RuntimeConfig  # noqa: E402
from kvpr.models.registry import BUILTIN_CONFIGS  # noqa: E402

# (phase, owner, attribute): each is timed inclusively; "other" is the cache's prefill less its parts
PHASES: tuple[tuple[str, Any, str], ...] = (
    # the compressed layers' attention with its log-sum-exp: replaces the dense attention (not overhead)
    ("attend_lse", compressed, "prefill_attention"),
    ("scores", compressed, "band_scores"),  # attention each prompt token received: the band, given the lse
    ("cache.prefill", kvo_cache.KVOCache, "prefill"),  # everything the KVO cache does with the prompt
    ("encode_recent", kvo_cache, "encode_recent"),  # K int8 per token (the recent form)
    ("decode_recent_k", kvo_cache, "decode_recent_k"),  # K back from int8: at decode only, since below
    # K from its int8 form (the torch path decodes it first, the fused one as it reads), reorder,
    # quantise, prune, pack
    ("encode_chunks", kvo_cache, "encode_chunks_from_recent"),
    ("rows.pack", RowLayout, "pack"),  # parts side by side into rows
    ("rows.write", RowTier, "write"),  # rows into their tier
)
NESTED = ("encode_recent", "decode_recent_k", "encode_chunks", "rows.pack", "rows.write")


@contextlib.contextmanager
def encoder_choice(encoder: str) -> Iterator[None]:
    """``encode_chunks_from_recent`` and ``encode_recent`` as the KVO cache calls them: auto (fused
    where they run), or forced."""
    saved = kvo_cache.encode_chunks_from_recent, kvo_cache.encode_recent
    if encoder != "auto":
        kvo_cache.encode_chunks_from_recent, kvo_cache.encode_recent = (
            functools.partial(fn, fused=encoder == "fused") for fn in saved
        )
    try:
        yield
    finally:
        kvo_cache.encode_chunks_from_recent, kvo_cache.encode_recent = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def phase_timers(device: torch.device, totals: dict[str, float]) -> Iterator[None]:
    """Wrap each of ``PHASES`` with synchronised wall timers adding into ``totals`` (seconds)."""
    saved = [(owner, attr, getattr(owner, attr)) for _, owner, attr in PHASES]

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - start
            return out

        return wrapper

    try:
        for (name, owner, attr), (_, _, fn) in zip(PHASES, saved):
            setattr(owner, attr, timed(name, fn))
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def model_source(model: str, layers: int | None, workdir: Path) -> str:
    """A built-in name, or a directory whose config.json is the built-in one with ``layers`` layers."""
    if layers is None:
        return model
    directory = workdir / f"{model}-{layers}l"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(BUILTIN_CONFIGS[model] | {"num_hidden_layers": layers}))
    return str(directory)


def time_prefill(llm: LLM, ids: torch.Tensor, valid: torch.Tensor, totals: dict[str, float] | None = None) -> float:
    """Seconds of one prefill on a fresh executor (its construction not counted, in ``totals`` neither)."""
    executor = llm.make_executor(ids.shape[0], ids.shape[1] + 8)
    if totals is not None:
        totals.clear()
    sync(llm.device)
    start = time.perf_counter()
    executor.prefill(ids, valid)
    sync(llm.device)
    elapsed = time.perf_counter() - start
    del executor
    gc.collect()
    if llm.device.type == "cuda":
        torch.cuda.empty_cache()
    return elapsed


def measure(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        source = model_source(args.model, args.layers, Path(workdir))
        runtime = RuntimeConfig(device=args.device, dtype=args.dtype)
        dense = LLM(
            EngineConfig(model=source, dummy_weights=True, runtime=runtime), args.batch_size, args.prompt_len + 8
        )
    kvo = dense.with_placement(CacheConfig(kv_codec="kvo"))
    generator = torch.Generator().manual_seed(args.seed)
    vocab = dense.model_config.vocab_size
    ids = torch.randint(3, vocab, (args.batch_size, args.prompt_len), generator=generator).to(dense.device)
    valid = torch.ones_like(ids, dtype=torch.bool)
    runs: dict[str, list[float]] = {"dense": [], "kvo": []}
    for llm in (dense, kvo):
        time_prefill(llm, ids, valid)  # warm-up at the timed shape
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, llm in (("dense", dense), ("kvo", kvo)):
            runs[name].append(time_prefill(llm, ids, valid))
    totals: dict[str, float] = {}
    with phase_timers(dense.device, totals):
        timed_total = time_prefill(kvo, ids, valid, totals)
    dense_s, kvo_s = statistics.median(runs["dense"]), statistics.median(runs["kvo"])
    phases = {name: totals.get(name, 0.0) for name, _, _ in PHASES}
    phases["cache.other"] = phases["cache.prefill"] - sum(phases[name] for name in NESTED)
    # the rest of the phased run past a dense prefill: executor differences, the lse's cost inside
    # attend_lse, timer syncs
    phases["unattributed"] = timed_total - dense_s - phases["scores"] - phases["cache.prefill"]
    return {
        "model": args.model,
        "layers": args.layers or dense.model_config.num_layers,
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "device": str(dense.device),
        "dtype": str(dense.dtype).removeprefix("torch."),
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "dense_s": dense_s,
        "kvo_s": kvo_s,
        "overhead_s": kvo_s - dense_s,
        "ratio": kvo_s / dense_s,
        "runs": runs,
        "encoder": args.encoder,
        "phases_s": phases,
        "phased_run_s": timed_total,
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"KVO prefill, {result['model']} ({result['layers']} layers), batch {result['batch_size']} x "
        f"{result['prompt_len']} tokens, {result['device']} {result['dtype']}, median of {result['repeats']}, "
        f"encoder {result['encoder']}",
        f"{'dense prefill':<24}{result['dense_s']:>10.3f} s",
        f"{'kvo prefill':<24}{result['kvo_s']:>10.3f} s",
        f"{'kvo overhead':<24}{result['overhead_s']:>10.3f} s   (kvo / dense = {result['ratio']:.2f}x)",
        f"phases of one synchronised KVO prefill ({result['phased_run_s']:.3f} s in all):",
    ]
    lines += [f"  {name:<22}{seconds:>10.3f} s" for name, seconds in result["phases_s"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="opt-125m", choices=sorted(BUILTIN_CONFIGS), help="built-in config")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count (default: 4 on CPU)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="float32 on CPU, float16 on CUDA by default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="directory for the JSON result")
    parser.add_argument("--encoder", default="auto", choices=("auto", "torch", "fused"), help="encode_chunks' path")
    add_provenance_args(parser)
    args = parser.parse_args()
    if args.layers is None and args.device == "cpu" and args.model == "opt-125m" and args.prompt_len <= 512:
        args.layers = 4  # the tiny default
    header = header_or_exit(args.allow_dirty)
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # a shared CPU: fewer threads than cores time more steadily
    with encoder_choice(args.encoder):
        result = measure(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        device = header["device"].replace(" ", "_")
        encoder = "" if args.encoder == "auto" else f"-{args.encoder}"
        stem = f"kvo-prefill-{args.model}-b{args.batch_size}-s{args.prompt_len}-{device}-{header['date']}{encoder}"
        path = args.out / f"{stem}.json"
        path.write_text(json.dumps({**header, **result}, indent=2) + "\n")
        print(f"wrote {path}")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
