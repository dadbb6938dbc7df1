"""Load on ``kvpr serve``: N concurrent streaming clients on loopback, against the offline batch.

The offline figure is ``LLM.generate`` of one batch of N seeded prompts on the same placement:
decode tokens/s (N new tokens per decode step, prefill excluded) and generation tokens/s (every
new token over prefill plus decode). The server is ``kvpr serve`` in its own process, started as
a user starts it (the same engine flags, ``--max-num-seqs N``); each of N clients sends
``--requests`` streamed completions one after another (seeded random token-id prompts of
``--prompt-len`` tokens, ``--max-tokens`` new ones, greedy, EOS ignored) until ``--max-seconds``
pass. Its tokens/s is every streamed token over the wall time of the run. Timed figures are
medians of ``--repeats`` runs with their range (one warm-up run first); each run also keeps time to
first token (median, p90), request latency and what the server's ``/metrics`` said (joins, batches
started, live rows per step, step time, slot utilisation, PCIe bytes per step, the split ``l``, and
``engine_s``: the engine loop's seconds by phase, idle, gather, start, join, step, deliver, other,
which add up to the run's wall time give or take the moments between runs). ``--engine-modes
thread process`` serves the same load twice, the engine in a thread of the HTTP process (``kvpr
serve``'s default) and in a process of its own (``--engine process``): ``serve`` is the first
mode's row, ``serve_by_mode`` every mode's.
Writes ``<tag>-<device>-<yyyymmdd>.json`` under ``--out`` with the provenance header.

    python benchmarks/bench_serve.py --device cpu --clients 4 --prompt-len 32 --max-tokens 8 --allow-dirty
    python benchmarks/bench_serve.py --model opt-6.7b --dummy-weights --offload cpu --recompute 1.0 \\
        --clients 32 --prompt-len 256 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import add_provenance_args, header_or_exit  # noqa: E402
from spread import aggregate  # noqa: E402

from kvpr.api import LLM  # noqa: E402
from kvpr.cli_engine import add_engine_flags, build_engine_config  # noqa: E402
from kvpr.config import SamplingParams  # noqa: E402
from kvpr.serve.metrics import ENGINE_PHASES  # noqa: E402

SERVED_NAME = "bench"
ENGINE_MODES = {mode: ["--engine", mode] for mode in ("thread", "process")}  # mode -> kvpr serve flags
OFFLINE_TIMED = ("decode_tokens_per_s", "generation_tokens_per_s", "prefill_s", "decode_ms_per_token")
SERVER_TIMED = ("tokens_per_s", "ttft_s", "ttft_p90_s", "request_s", "wall_s", "step_ms", "live_rows_per_step")


def seeded_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (count, length), generator=generator).tolist()


# -- offline: one batch of N through LLM.generate --------------------------------------------------


def offline(llm: LLM, args: argparse.Namespace) -> dict[str, Any]:
    prompts = seeded_prompts(args.clients, args.prompt_len, llm.model_config.vocab_size, seed=0)
    llm.generate(prompts, SamplingParams(max_new_tokens=2, stop_on_eos=False))  # warm-up at the timed batch
    runs = []
    for _ in range(args.repeats):
        llm.generate(prompts, SamplingParams(max_new_tokens=args.max_tokens, stop_on_eos=False))
        stats = llm.last_stats
        assert stats is not None
        decode_s = sum(stats.step_s)
        runs.append(
            {
                "decode_tokens_per_s": args.clients * len(stats.step_s) / decode_s,
                "generation_tokens_per_s": args.clients * (len(stats.step_s) + 1) / (stats.prefill_s + decode_s),
                "prefill_s": stats.prefill_s,
                "decode_ms_per_token": 1e3 * decode_s / len(stats.step_s),
            }
        )
    return aggregate(runs, OFFLINE_TIMED)


# -- the server: kvpr serve in its own process -----------------------------------------------------


class Server:
    """``kvpr serve`` with the bench's engine flags on a free loopback port; stderr drained to a tail."""

    def __init__(self, engine_args: list[str], args: argparse.Namespace) -> None:
        command = [sys.executable, "-m", "kvpr", "serve", *engine_args, "--port", "0", "--host", "127.0.0.1"]
        command += ["--max-num-seqs", str(args.clients), "--max-model-len", str(args.server_len)]
        command += ["--max-waiting", str(args.clients), "--served-model-name", SERVED_NAME]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
        self.log: list[str] = []
        line = ""
        while not line.startswith("kvpr serve: "):
            line = self.process.stderr.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit(f"kvpr serve did not start:\n{''.join(self.log[-20:])}")
            self.log.append(line)
        self.banner = line.strip()
        self.url = line.split(" on ")[1].split()[0].removesuffix("/v1")
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"kvpr serve did not answer /health:\n{''.join(self.log[-20:])}")
            time.sleep(0.2)

    def _drain(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self.log = [*self.log[-200:], line]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # SIGINT: uvicorn's graceful shutdown
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _request(http: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One streamed completion: time to first token, latency, tokens (from the usage chunk)."""
    body = {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    began, first, tokens = time.perf_counter(), None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(choice["finish_reason"] is None for choice in chunk["choices"]):
                first = time.perf_counter()  # a token's chunk (one per token, its text may be empty)
    done = time.perf_counter()
    return {"ttft_s": (first or done) - began, "request_s": done - began, "tokens": tokens}


async def _load(url: str, prompts: list[list[list[int]]], max_tokens: int, deadline: float) -> dict[str, Any]:
    """N clients, each sending its prompts one after another until ``deadline``; the run's figures."""
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:

        async def client(own: list[list[int]]) -> list[dict[str, Any]]:
            done = []
            for prompt in own:
                if time.perf_counter() > deadline:
                    break
                done.append(await _request(http, prompt, max_tokens))
            return done

        began = time.perf_counter()
        records = [record for own in await asyncio.gather(*(client(own) for own in prompts)) for record in own]
        wall = time.perf_counter() - began
    errors = [record["error"] for record in records if "error" in record]
    good = [record for record in records if "error" not in record]
    ttft = sorted(record["ttft_s"] for record in good)
    return {
        "requests": len(good),
        "errors": errors[:5],
        "tokens": sum(record["tokens"] for record in good),
        "wall_s": wall,
        "tokens_per_s": sum(record["tokens"] for record in good) / wall,
        "ttft_s": statistics.median(ttft) if ttft else None,
        "ttft_p90_s": ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))] if ttft else None,
        "request_s": statistics.median(record["request_s"] for record in good) if good else None,
    }


def _server_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What /metrics moved by during one run (counters as differences, gauges as read after it)."""

    def moved(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = moved("kvpr_decode_step_seconds_count")
    return {
        "joins": moved("kvpr_rows_joined_total"),
        "batches_started": moved("kvpr_batches_started_total"),
        "decode_steps": steps,
        "step_ms": 1e3 * moved("kvpr_decode_step_seconds_sum") / steps if steps else None,
        "live_rows_per_step": moved("kvpr_decode_step_live_rows_sum") / steps if steps else None,
        "pcie_h2d_bytes_per_step": moved("kvpr_pcie_bytes_total{direction=h2d}") / steps if steps else None,
        "recompute_tokens_last": after.get("kvpr_recompute_tokens"),
        "host_tokens_last": after.get("kvpr_host_tokens"),
        "slot_utilisation": moved("kvpr_live_slots_total") / moved("kvpr_row_slots_total") if steps else None,
        "engine_s": {phase: moved(f"kvpr_engine_seconds_total{{phase={phase}}}") for phase in ENGINE_PHASES},
    }


def serve(engine_args: list[str], args: argparse.Namespace, vocab: int) -> tuple[dict[str, Any], str]:
    server = Server(engine_args, args)  # engine_args: with --engine MODE
    try:
        deadline = time.perf_counter() + args.max_seconds
        warm = [seeded_prompts(1, args.prompt_len, vocab, seed=1000 + c) for c in range(args.clients)]
        asyncio.run(_load(server.url, warm, args.max_tokens, deadline))  # kernels, allocator, every length once
        runs = []
        for repeat in range(args.repeats):
            prompts = [
                seeded_prompts(args.requests, args.prompt_len, vocab, seed=10_000 * (repeat + 1) + client)
                for client in range(args.clients)
            ]
            before = server.metrics()
            run = asyncio.run(_load(server.url, prompts, args.max_tokens, deadline))
            run.update(_server_figures(before, server.metrics()))
            runs.append(run)
            print(json.dumps({"repeat": repeat, **{k: v for k, v in run.items() if k != "errors"}}), flush=True)
            if time.perf_counter() > deadline:
                break
        return {**aggregate(runs, SERVER_TIMED), "runs": runs}, server.banner
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="other flags: kvpr's engine flags")
    parser.add_argument("--clients", type=int, default=None, help="concurrent clients = rows (default: 32 CUDA, 4 CPU)")
    parser.add_argument("--requests", type=int, default=2, help="streamed requests per client and run")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median, min, max)")
    parser.add_argument(
        "--server-len",
        type=int,
        default=None,
        help="the server's --max-model-len: token slots per row (default: --prompt-len + --max-tokens)",
    )
    parser.add_argument("--max-seconds", type=float, default=150.0, help="no request starts after this (load phase)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="serve")
    parser.add_argument(
        "--engine-modes",
        nargs="+",
        choices=ENGINE_MODES,
        default=["thread"],
        help="where the server runs its token loop, each mode a server of its own on the same load",
    )
    add_provenance_args(parser)
    args, engine_args = parser.parse_known_args()
    engine_parser = argparse.ArgumentParser(prog="bench_serve.py (engine flags)")
    add_engine_flags(engine_parser)
    config = build_engine_config(engine_parser.parse_args(engine_args))
    if min(args.requests, args.prompt_len, args.max_tokens, args.repeats) < 1:
        parser.error("--requests, --prompt-len, --max-tokens and --repeats must be >= 1")
    args.server_len = args.server_len or args.prompt_len + args.max_tokens
    if args.server_len < args.prompt_len + args.max_tokens:
        parser.error(f"--server-len {args.server_len}: must hold --prompt-len + --max-tokens")
    header = header_or_exit(args.allow_dirty)  # before anything runs: a refused result costs nothing
    llm = LLM(config, batch_size=args.clients or 1, max_len=args.prompt_len + args.max_tokens)
    args.clients = args.clients or (32 if llm.device.type == "cuda" else 4)
    llm.check_fits(args.clients, args.prompt_len + args.max_tokens)
    offline_row = offline(llm, args)
    name, vocab, device = llm.name, llm.model_config.vocab_size, llm.device
    print(json.dumps({"offline": {k: v for k, v in offline_row.items() if not k.endswith("_runs")}}), flush=True)
    del llm  # the server process loads its own copy
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    by_mode = {}
    for mode in dict.fromkeys(args.engine_modes):
        by_mode[mode] = serve(engine_args + ENGINE_MODES[mode], args, vocab)
    server_row, banner = by_mode[args.engine_modes[0]]
    ratio = (server_row["tokens_per_s"] or 0.0) / offline_row["decode_tokens_per_s"]
    result = {
        **header,
        "model": name,
        "engine_args": engine_args,
        "server": banner,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "server_len": args.server_len,
        "repeats": args.repeats,
        "offline": offline_row,
        "serve": server_row,
        "ratio_to_offline_decode": ratio,
        "ratio_to_offline_generation": (server_row["tokens_per_s"] or 0.0) / offline_row["generation_tokens_per_s"],
        "engine_mode": args.engine_modes[0],
    }
    if len(by_mode) > 1:
        result["serve_by_mode"] = {mode: row for mode, (row, _) in by_mode.items()}
        result["ratio_to_offline_decode_by_mode"] = {
            mode: (row["tokens_per_s"] or 0.0) / offline_row["decode_tokens_per_s"]
            for mode, (row, _) in by_mode.items()
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.tag}-{header['device'].replace(' ', '_')}-{header['date']}.json"
    path.write_text(json.dumps(result, indent=1))
    for mode, (row, _) in by_mode.items():
        print(
            f"{name} {args.clients} clients x {args.requests} requests, {args.prompt_len} + {args.max_tokens} tokens, "
            f"engine {mode}: server {row['tokens_per_s']:.1f} tokens/s [{row['tokens_per_s_min']:.1f}-"
            f"{row['tokens_per_s_max']:.1f}], offline batch decode {offline_row['decode_tokens_per_s']:.1f} "
            f"(generation {offline_row['generation_tokens_per_s']:.1f}): "
            f"{(row['tokens_per_s'] or 0.0) / offline_row['decode_tokens_per_s']:.0%} of offline decode; "
            f"TTFT median {row['ttft_s']:.3f} s"
        )
    print(path)


if __name__ == "__main__":
    main()
