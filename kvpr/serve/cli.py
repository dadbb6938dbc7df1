"""``kvpr serve``: its flags, the limits resolved against the placement's memory check (in the engine
process, which loads the model), and uvicorn.

Kept out of cli.py, which only registers the subcommand; FastAPI and uvicorn are imported when the
server runs, so the other subcommands start as fast as before.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvpr.cli_checks import at_least
from kvpr.config import EngineConfig, parse_auto_count
from kvpr.errors import KvprError

if TYPE_CHECKING:
    from kvpr.api import LLM
    from kvpr.serve.engine import Engine
    from kvpr.serve.requests import ServeConfig
    from kvpr.serve.wire import EngineSpec

DEFAULT_CONTEXT = 2048  # --max-model-len when not given (at most the model's own)
DEFAULT_ROWS = {"cuda": 32, "cpu": 8}  # --max-num-seqs auto: the most rows tried, halved until they fit
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on")
    server.add_argument("--port", type=at_least(0), default=8000, help="port to listen on (0: any free one, printed)")
    server.add_argument(
        "--max-num-seqs",
        default="auto",
        help="rows decoded together: a count, or auto (the most of "
        f"{DEFAULT_ROWS['cuda']} on CUDA, {DEFAULT_ROWS['cpu']} elsewhere, halved until the cache fits)",
    )
    server.add_argument(
        "--max-model-len",
        type=at_least(2),
        default=None,
        help=f"a request's prompt + max_tokens, and the batch's token slots (default: the model's, at most "
        f"{DEFAULT_CONTEXT})",
    )
    server.add_argument(
        "--max-waiting",
        type=at_least(0),
        default=None,
        help="requests queued beyond the rows; more get HTTP 429 (default: 4 x --max-num-seqs)",
    )
    server.add_argument(
        "--batch-wait-ms",
        type=non_negative_float,
        default=20.0,
        help="an empty batch starts once this long passed without a new request (or its rows are full)",
    )
    server.add_argument("--served-model-name", default=None, help="the model's name in the API (default: --model's)")
    server.add_argument("--log-level", choices=LOG_LEVELS, default="warning", help="uvicorn's log level")
    server.add_argument(
        "--engine",
        choices=("thread", "process"),
        default="thread",
        help="where the token loop runs: a thread of the HTTP process (measured faster on the H200: "
        "README) or a process of its own (isolated: its death fails requests with 503, the server lives)",
    )


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number: give one >= 0") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def _rows_flag(value: str) -> int | None:
    return parse_auto_count(value, "--max-num-seqs")


def model_context(llm: LLM) -> int:
    """Positions the model supports (its sliding window, if smaller)."""
    cfg = llm.model_config
    return cfg.max_position if cfg.sliding_window is None else min(cfg.max_position, cfg.sliding_window)


def resolve_limits(
    llm: LLM, rows_flag: str, max_model_len: int | None, max_waiting: int | None
) -> tuple[int, int, int]:
    """(rows, tokens per row, queue) for this placement: explicit rows must pass the memory check
    (``LLM.check_fits``, one line otherwise); auto halves from the default until they do."""
    context = model_context(llm)
    length = max_model_len or min(context, DEFAULT_CONTEXT)
    if length > context:
        raise KvprError(f"--max-model-len {length}: {llm.name} supports {context} positions")
    wanted = _rows_flag(rows_flag)
    throughput = llm.config.throughput
    block = throughput.block_size if throughput is not None else None
    if wanted is not None:
        if block is not None and wanted > block:
            raise KvprError(f"--max-num-seqs {wanted} exceeds the throughput block of {block} rows: raise the block")
        llm.check_fits(wanted, length)
        rows = wanted
    else:
        rows = min(DEFAULT_ROWS["cuda" if llm.device.type == "cuda" else "cpu"], block or sys.maxsize)
        while True:
            try:
                llm.check_fits(rows, length)
                break
            except KvprError:
                if rows == 1:
                    raise
                rows //= 2
    return rows, length, 4 * rows if max_waiting is None else max_waiting


def run_serve(args: argparse.Namespace, build_engine_config: Callable[[argparse.Namespace], EngineConfig]) -> int:
    """Start the engine (load the model, size the batch), and serve until interrupted."""
    import uvicorn

    from kvpr.serve.app import create_engine_app
    from kvpr.serve.wire import EngineSpec

    spec = EngineSpec(
        build_engine_config(args), args.max_num_seqs, args.max_model_len, args.max_waiting, args.batch_wait_ms
    )
    _rows_flag(args.max_num_seqs)  # a bad value fails before the weights load
    listener = _listen(args.host, args.port)
    engine = _thread_engine(spec) if args.engine == "thread" else _process_engine(spec)
    try:
        app = create_engine_app(engine, args.served_model_name)
        server, info = app.state.server, engine.info
        limits = info.limits
        host, port = listener.getsockname()[:2]
        policy = "continuous batching" if info.continuous else "whole batches (the cache takes no row mid-run)"
        where = "engine thread" if info.mode == "thread" else f"engine process {info.pid}"
        print(
            f"kvpr serve: {server.name} on http://{host}:{port}/v1 ({limits.max_rows} rows x {limits.max_model_len} "
            f"tokens, {policy}; {where})",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False)).run(sockets=[listener])
    finally:
        engine.stop()  # stopped already by the app's lifespan, unless uvicorn never started
    return 0


def _process_engine(spec: EngineSpec) -> Engine:
    from kvpr.serve.engine_process import ProcessEngine

    return ProcessEngine(spec)


def _thread_engine(spec: EngineSpec) -> Engine:
    from kvpr.serve.engine import ThreadEngine

    return ThreadEngine(*load_for_serving(spec))


def load_for_serving(spec: EngineSpec) -> tuple[LLM, ServeConfig]:
    """The model loaded and the serve limits resolved against its placement, in whichever process
    runs the loop; the batch's cache is allocated (and checked) by the ``Batcher`` built on them."""
    from kvpr.api import LLM
    from kvpr.serve.requests import ServeConfig

    llm = LLM(spec.config, batch_size=1, max_len=2)  # the batch is sized (and checked) once the context is known
    rows, length, waiting = resolve_limits(llm, spec.rows, spec.max_model_len, spec.max_waiting)
    return llm, ServeConfig(rows, length, waiting, spec.batch_wait_ms)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a busy port fails in one line, at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise KvprError(f"cannot listen on {host}:{port} ({err.strerror}): pick another --port or --host") from None
    listener.listen(2048)
    return listener
