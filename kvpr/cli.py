"""``kvpr generate | bench | profile | plan | eval | serve``: argparse -> EngineConfig -> api. Nothing else.

Every user-fixable problem (a bad flag value too) is a KvprError, printed as one line with exit
code 2; Ctrl-C prints one line and exits 130, the shell's code for SIGINT, so scripts can tell an
interrupted run from a failed one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from kvpr.cli_checks import (
    DefaultsFormatter,
    OneLineParser,
    at_least,
    check_output_path,
    check_prompt_text,
    package_version,
    positive_float,
)
from kvpr.cli_commands import run_plan, run_profile
from kvpr.cli_engine import add_engine_flags, build_engine_config
from kvpr.config import (
    EngineConfig,
    RuntimeConfig,
    SamplingParams,
    parse_recompute,
)
from kvpr.errors import KvprError
from kvpr.eval.tasks import TASK_NAMES
from kvpr.serve.cli import add_serve_flags, run_serve
from kvpr.sim.cli import register_sim, run_sim


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="kvpr",
        description="LLM inference with an offloaded KV cache and partial recomputation",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, formatter_class=DefaultsFormatter)

    count = at_least(1)  # a count of 0 would run as something else (bench: batch 1) or not at all
    generate = command("generate", "generate text for one or more prompts")
    add_engine_flags(generate)
    generate.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    generate.add_argument(
        "--chat-template",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wrap each prompt as a user turn in the model's chat template, where its tokenizer has one "
        "(instruct models answer turns; --no-chat-template continues the raw text)",
    )
    generate.add_argument("--max-new-tokens", type=count, default=32, help="tokens to generate per prompt")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this probability mass")
    generate.add_argument("--seed", type=int, default=0, help="sampling seed")
    generate.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    generate.add_argument("--json", action="store_true", help="print token ids, text and per-step timings as JSON")

    bench = command("bench", "time prefill and decode on synthetic prompts")
    add_engine_flags(bench)
    bench.add_argument("--batch-size", type=count, default=None, help="rows (default: 1; in throughput mode one block)")
    bench.add_argument(
        "--policy",
        choices=["manual", "auto"],
        default="manual",
        help="throughput mode: auto searches placement, batch sizes and recompute fraction from the cost model",
    )
    bench.add_argument("--prompt-len", type=count, default=256, help="prompt tokens per row")
    bench.add_argument("--gen-len", type=count, default=32, help="generated tokens per row")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--trace", default=None, help="write a Chrome/Perfetto trace of the timed run to this file")

    profile = command("profile", "measure this machine's copy bandwidth and GEMM rates for a model")
    profile.add_argument("--model", default=None, help="model whose shapes to profile (weights are not loaded)")
    profile.add_argument("--batch-size", type=count, default=1, help="batch of the attention timings")
    profile.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    profile.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    profile.add_argument("--profile", default=None, help="file to write (default: the user's cache directory)")
    profile.add_argument("--reprofile", action="store_true", help="measure again even if a cached profile fits")

    plan = command("plan", "print the split the scheduler picks and the predicted time of each alternative")
    plan.add_argument("--model", default=None, help="model whose shapes to plan for (default: the default model)")
    plan.add_argument("--batch-size", type=count, default=1, help="rows of the batch")
    plan.add_argument("--context", type=count, nargs="+", default=[256, 1024, 2048, 4096], help="context lengths s")
    plan.add_argument(
        "--gpu-resident", type=at_least(0), default=0, help="latency mode: tokens whose K,V stay on the GPU tier"
    )
    plan.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    plan.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    plan.add_argument("--num-chunks", default="auto", help="X chunks per layer: auto or a count")
    plan.add_argument("--kv-codec", default="none", help="how the host tier stores K,V: none, int8 or int4")
    plan.add_argument("--x-codec", default="none", help="how the host tier stores X: none, int8 or int4")
    plan.add_argument("--profile", default=None, help="hardware profile JSON (lets a GPU plan be made on any machine)")
    plan.add_argument(
        "--mode", choices=["latency", "throughput"], default="latency", help="throughput: search the placement"
    )
    plan.add_argument("--prompt-len", type=count, default=256, help="throughput mode: prompt tokens per sequence")
    plan.add_argument("--gen-len", type=count, default=32, help="throughput mode: generated tokens per sequence")
    plan.add_argument("--offload-dir", default=None, help="throughput mode: allow a disk tier in this directory")
    plan.add_argument("--host-memory-gib", type=positive_float, default=None, help="host memory the plan may use")
    plan.add_argument(
        "--gpu-memory-gib", type=positive_float, default=None, help="GPU memory (default: free memory now)"
    )

    evaluate = command("eval", "perplexity and long-context retrieval under several cache codecs")
    evaluate.add_argument("--model", default=None, help="model to evaluate (default: the default model)")
    evaluate.add_argument(
        "--codecs",
        nargs="+",
        default=["none", "int8", "int4"],
        help="none (as computed), fp16, int8, int4, kivi2, kivi3, kivi4, kvo, h2o, streaming, quest; a method takes "
        "knobs as name:field=value,... (e.g. h2o:budget=256, kivi4:rotate=v); <kivi spec>@hf runs it through "
        "transformers",
    )
    evaluate.add_argument("--recompute", default="off", help="split used with the offloaded codecs (see generate)")
    evaluate.add_argument("--x-codec", default="none", help="how those codecs store X for recomputation (see generate)")
    evaluate.add_argument(
        "--context", type=at_least(32), nargs="+", default=[512, 1024], help="context lengths in tokens"
    )
    evaluate.add_argument("--items", type=count, default=10, help="items per task and context length")
    evaluate.add_argument("--windows", type=at_least(0), default=4, help="perplexity windows per context length")
    evaluate.add_argument(
        "--tasks", nargs="+", default=None, choices=TASK_NAMES, help="task families to run (default: all)"
    )
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the items and windows")
    evaluate.add_argument("--batch-size", type=count, default=4, help="items run together")
    evaluate.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    evaluate.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16")
    evaluate.add_argument("--out", default="eval-results", help="directory for the JSON, markdown and PNG")
    evaluate.add_argument("--json", action="store_true", help="also print the rows as JSON")
    register_sim(command)

    serve = command("serve", "an OpenAI-compatible HTTP server that batches concurrent requests")
    add_engine_flags(serve)
    add_serve_flags(serve)
    return parser


def _run_eval(args: argparse.Namespace) -> int:
    from kvpr.api import LLM
    from kvpr.eval.harness import cache_for_spec, evaluate, write_report

    check_output_path(args.out, "--out", directory=True)  # before the evaluation, not after it
    recompute = parse_recompute(args.recompute)
    configs = [(spec, cache_for_spec(spec, recompute, args.x_codec)) for spec in args.codecs]
    llm = LLM(EngineConfig(model=args.model, runtime=RuntimeConfig(device=args.device, dtype=args.dtype)))
    rows = evaluate(
        llm,
        configs,
        args.context,
        args.items,
        args.seed,
        tasks=tuple(args.tasks or TASK_NAMES),
        num_windows=args.windows,
        batch_size=args.batch_size,
    )
    paths = write_report(rows, args.out, llm.name)
    for row in rows:
        print(
            f"{row['codec']:>6} ctx={row['context_len']:5d} bytes/token={row['bytes_per_token']:8.0f} "
            f"read/token={row['read_bytes_per_token']:8.0f} "
            f"ppl={row['ppl'] if row['ppl'] is None else format(row['ppl'], '.2f')} "
            f"retrieval={row['retrieval_acc'] if row['retrieval_acc'] is None else format(row['retrieval_acc'], '.2f')}"
        )
    print(f"report: {paths['json']} {paths['markdown']} {paths['png']}")
    if args.json:
        print(json.dumps([{k: v for k, v in row.items() if k != "items"} for row in rows], indent=1))
    return 0


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop_on_eos=not args.ignore_eos,
    )


def _run_generate(args: argparse.Namespace) -> int:
    from kvpr.api import LLM

    check_prompt_text(args.prompt, "--prompt")
    params = _sampling(args)
    # the prompts' token counts are not known before the tokenizer: check the batch for the new tokens
    llm = LLM(build_engine_config(args), batch_size=len(args.prompt), max_len=args.max_new_tokens + 1)
    prompts = [llm.format_prompt(prompt, args.chat_template) for prompt in args.prompt]
    chat = prompts != list(args.prompt)  # the template was applied (the tokenizer has one)
    stream = len(args.prompt) == 1 and not args.json
    printer = _StreamPrinter(llm, "" if chat else args.prompt[0]) if stream else None
    try:
        completions = llm.generate(prompts, params, on_token=printer.on_token if printer else None)
    finally:  # also on Ctrl-C: end the streamed line before the message
        if printer is not None:
            printer.close()
    if args.json:
        stats = llm.last_stats.to_dict() if llm.last_stats else {}
        results = [
            {
                "prompt": p,
                "prompt_token_ids": c.prompt_token_ids,
                "token_ids": c.token_ids,
                "text": c.text,
                "finish_reason": c.finish_reason,
            }
            for p, c in zip(args.prompt, completions)
        ]
        report = {"model": llm.name, "chat_template": chat, "completions": results, "stats": stats}
        print(json.dumps(report, indent=1))
    elif printer is None:  # a chat reply is not a continuation: it goes under its prompt
        for prompt, completion in zip(args.prompt, completions):
            print(f"> {prompt}\n{completion.text}" if chat else f"{prompt}{completion.text}")
    return 0


class _StreamPrinter:
    """Prints a single prompt's continuation as tokens arrive (decoding the whole suffix each time
    so multi-token characters come out right)."""

    def __init__(self, llm: Any, prompt: str) -> None:
        self.llm = llm
        self.tokens: list[int] = []
        self.printed = ""
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def on_token(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.llm.decode_text(self.tokens)
        sys.stdout.write(text[len(self.printed) :])
        sys.stdout.flush()
        self.printed = text

    def close(self) -> None:
        sys.stdout.write("\n")


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from kvpr.api import LLM

    if args.trace:
        check_output_path(args.trace, "--trace")  # before the run, not after it
    config = build_engine_config(args)
    if args.policy == "auto":
        config = _auto_policy(config, args)
    # Throughput mode's natural batch is one full block (as FlexGen runs it).
    batch_size = args.batch_size or (config.throughput.block_size if config.throughput else 1)
    if batch_size < 1:
        raise KvprError(f"--batch-size {batch_size}: must be >= 1")
    llm = LLM(config, batch_size, args.prompt_len + args.gen_len)  # memory checked before the weights load
    generator = torch.Generator().manual_seed(args.seed)
    vocab = llm.model_config.vocab_size
    prompts = torch.randint(0, vocab, (batch_size, args.prompt_len), generator=generator).tolist()
    params = SamplingParams(max_new_tokens=args.gen_len, stop_on_eos=False)
    # warm-up at the timed batch: kernel choice, allocator and the plan of its shapes stay out of the timing
    llm.generate(prompts, SamplingParams(max_new_tokens=2, stop_on_eos=False))
    if args.trace:
        _traced(lambda: llm.generate(prompts, params), args.trace)
    else:
        llm.generate(prompts, params)
    stats = llm.last_stats
    assert stats is not None
    throughput = config.throughput
    report = {
        "model": llm.name,
        "device": torch.cuda.get_device_name(llm.device) if llm.device.type == "cuda" else "cpu",
        "mode": "latency" if throughput is None else "throughput",
        "offload": config.cache.offload.value,
        "recompute": config.cache.recompute,
        "overlap": not args.no_overlap,
        "gen_len": args.gen_len,
        **stats.to_dict(),
    }
    if throughput is not None:
        report["policy"] = {
            "percent": list(throughput.placement.as_percent()),
            "gpu_batch_size": throughput.gpu_batch_size,
            "num_gpu_batches": throughput.num_gpu_batches,
            "pin_weight": throughput.pin_weight,
            "compress_weight": throughput.compress_weight,
        }
    steps = stats.step_s
    decode_s = sum(steps)
    report["tokens_per_s"] = batch_size * len(steps) / decode_s if decode_s else None
    # FlexGen's figure: every generated token over prefill plus decode.
    report["generation_tokens_per_s"] = batch_size * (len(steps) + 1) / (stats.prefill_s + decode_s)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        ms = report["decode_ms_per_token"]
        recompute = stats.recompute_lens[-1] if stats.recompute_lens else 0
        where = f"offload={report['offload']}" if throughput is None else f"--percent {throughput.placement}"
        print(
            f"{llm.name} b={batch_size} prompt={args.prompt_len} gen={args.gen_len} {where} "
            f"recompute={config.cache.recompute}: prefill {stats.prefill_s:.3f} s, decode {ms:.2f} ms/token, "
            f"{report['generation_tokens_per_s']:.1f} generated tokens/s, last l={recompute}"
        )
    return 0


def _auto_policy(config: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """``--policy auto``: the searched throughput policy for this workload replaces the flags'."""
    from kvpr.placement import plan_throughput, with_throughput_plan
    from kvpr.scheduler.throughput_policy import format_plans

    if config.throughput is None:
        raise KvprError("--policy auto searches a throughput-mode policy: add --mode throughput")
    plan = plan_throughput(config, args.prompt_len, args.gen_len)
    print(format_plans([("auto", plan)]), file=sys.stderr)
    return with_throughput_plan(config, plan)


def _traced(run: Any, path: str) -> None:
    """Run under torch.profiler; write a Chrome trace (copies and kernels per stream) and print the
    top operations by device time to stderr."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    prof.export_chrome_trace(path)
    sort_key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=15), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``kvpr`` command: 0 on success, 2 on a user-fixable error (one line on stderr), 130 when
    interrupted with Ctrl-C (one line, no traceback)."""
    try:
        args = _parser().parse_args(argv)
        _quiet_libraries()
        runners = {
            "generate": _run_generate,
            "bench": _run_bench,
            "profile": run_profile,
            "plan": run_plan,
            "eval": _run_eval,
            "serve": lambda args: run_serve(args, build_engine_config),
            "sim": run_sim,
        }
        tensor_parallel = getattr(args, "tensor_parallel", 1)
        if tensor_parallel > 1 and args.command == "serve":
            raise KvprError(f"--tensor-parallel {tensor_parallel} is not supported by kvpr serve yet: drop it")
        if tensor_parallel > 1 and os.environ.get("RANK", "0") != "0":  # only rank 0 prints results
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                return runners[args.command](args)
        return runners[args.command](args)
    except SystemExit as done:  # --help and --version
        return done.code if isinstance(done.code, int) else 0
    except KvprError as err:
        print(f"kvpr: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvpr: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """transformers' loading chatter is not the user's business in a CLI run."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
