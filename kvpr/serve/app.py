"""The HTTP face of ``kvpr serve``: OpenAI's completions, chat completions and models endpoints,
``/health`` and ``/metrics``, on FastAPI.

Handlers run on the event loop: they validate, tokenize (the tokenizer is only ever used from this
thread), queue the choices with the engine (``engine.py``: its own process under ``kvpr serve``, a
thread of this one through ``create_app``) and turn its token events into text, streamed as
server-sent events or answered whole. A bad request is a 400 with one line, a full server a 429, a
server whose engine process died a 503; none disturbs the requests being decoded. A client that
goes away cancels its choices, which frees their rows at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvpr.config import SamplingParams
from kvpr.errors import KvprError
from kvpr.serve.engine import Engine, ThreadEngine
from kvpr.serve.metrics import ServeMetrics
from kvpr.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, _Sampling, validation_message
from kvpr.serve.requests import EngineUnavailable, Event, QueueFull, Sequence, ServeConfig, request_seed
from kvpr.serve.text import TextStream
from kvpr.tokens import tokenize

if TYPE_CHECKING:
    from kvpr.api import LLM

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class EngineFailed(Exception):
    """The engine ended a choice with an error (its message is one line)."""


class ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class _Server:
    """What the handlers share: the engine, its limits, the tokenizer and the served name."""

    def __init__(self, engine: Engine, name: str | None) -> None:
        info = engine.info
        self.engine = engine
        self.config: ServeConfig = info.limits
        self.model_name = info.model_name
        self.name = name or info.model_name
        self.vocab_size = info.vocab_size
        self.tokenizer = engine.tokenizer
        policy = "continuous" if info.continuous else "whole-batch"
        self.metrics = ServeMetrics(self.name, policy, engine.metrics, info.mode, info.pid)
        self.created = int(time.time())

    def check_model(self, model: str) -> None:
        if model not in (self.name, self.model_name):
            message = f"model '{model}' is not served here: use '{self.name}' (GET /v1/models)"
            raise ApiError(404, message, kind="not_found_error", param="model")

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                message = (
                    f"model {self.model_name} has no tokenizer: pass token ids, or a model directory with tokenizer "
                    "files"
                )
                raise ApiError(400, message, param="prompt")
            try:
                return tokenize(self.tokenizer, prompt)
            except KvprError as err:
                raise ApiError(400, str(err), param="prompt") from None
        vocab = self.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            raise ApiError(400, f"a prompt token id lies outside the vocabulary [0, {vocab})", param="prompt")
        return list(prompt)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        tokenizer = self.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {self.name} has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # the template's own checks (a role order it refuses, ...)
            raise ApiError(400, f"the chat template refused the messages: {err}", param="messages") from None
        return self.encode(text)

    def sequences(
        self, prompts: list[list[int]], body: _Sampling, max_tokens: int | None, deliver: Any
    ) -> list[Sequence]:
        """One sequence per prompt and choice, after every limit check (400s)."""
        for field, why in body.unsupported():
            raise ApiError(400, why, param=field)
        limit, held = self.config.max_model_len, self.config.max_rows + self.config.max_waiting
        if len(prompts) * body.n > held:
            raise ApiError(400, f"{len(prompts) * body.n} choices exceed the {held} this server holds at once", "n")
        sequences = []
        for prompt_index, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, "a prompt is empty after tokenization: give it at least one token", param="prompt")
            wanted = limit - len(ids) if max_tokens is None else max_tokens
            if wanted < 1 or len(ids) + wanted > limit:
                raise ApiError(
                    400,
                    f"this server's context is {limit} tokens (--max-model-len); the prompt has {len(ids)} tokens "
                    f"and max_tokens asks for {wanted}: shorten the prompt or lower max_tokens",
                    param="max_tokens",
                )
            for choice in range(body.n):
                index = prompt_index * body.n + choice
                params = SamplingParams(
                    max_new_tokens=wanted,
                    temperature=body.temperature,
                    top_p=body.top_p,
                    seed=request_seed(body.seed, index),
                    stop_on_eos=not body.ignore_eos,
                )
                sequences.append(Sequence(ids, params, index, deliver))
        return sequences


class _Run:
    """One request's choices on their way: the engine's events turned into text per choice."""

    def __init__(self, server: _Server, prompts: list[list[int]], body: _Sampling, max_tokens: int | None) -> None:
        self.server = server
        self.queue: asyncio.Queue[list[Event] | None] = asyncio.Queue()
        # the engine delivers on the event loop
        self.sequences = server.sequences(prompts, body, max_tokens, self.queue.put_nowait)
        self.texts = [TextStream(server.tokenizer, body.stops()) for _ in self.sequences]
        self.finished: dict[int, str] = {}  # choice -> finish reason
        self.prompt_tokens = sum(len(ids) for ids in prompts)

    def submit(self) -> None:
        try:
            self.server.engine.submit(self.sequences)
        except QueueFull as full:
            raise ApiError(429, str(full), kind="rate_limit_error") from None
        except EngineUnavailable as gone:
            raise ApiError(503, str(gone), kind="server_error") from None

    def cancel(self) -> None:
        """Free the rows of every choice still running (the client is gone)."""
        unfinished = [s for s in self.sequences if s.tag not in self.finished]
        if unfinished:
            self.server.engine.cancel(unfinished)

    def client_gone(self) -> None:
        self.cancel()
        self.queue.put_nowait(None)

    async def updates(self) -> AsyncIterator[set[int]]:
        """The choices whose text changed, event batch by event batch, until all are finished."""
        while len(self.finished) < len(self.sequences):
            events = await self.queue.get()
            if events is None:
                raise ClientGone()
            changed: set[int] = set()
            for sequence, kind, value in events:
                index = sequence.tag
                if index in self.finished:
                    continue  # tokens after a stop sequence
                text = self.texts[index]
                if kind == "error":
                    self.cancel()
                    raise EngineFailed(value)
                if kind == "unavailable":
                    raise EngineUnavailable(value)
                if kind == "token":
                    text.push(value)
                    if text.stopped:
                        self.finished[index] = "stop"
                        self.server.engine.cancel([sequence])
                else:
                    text.finish()
                    self.finished[index] = "stop" if text.stopped else FINISH_REASONS[value]
                changed.add(index)
            yield changed

    def usage(self) -> dict[str, int]:
        completion = sum(text.num_tokens for text in self.texts)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _chunk(kind: str, run_id: str, created: int, model: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {"id": run_id, "object": kind, "created": created, "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"


async def _answer(server: _Server, request: Request, run: _Run, chat: bool, stream: bool, usage: bool) -> Response:
    """Run the choices and answer: whole (JSON) or streamed (server-sent events)."""
    run_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created, model = int(time.time()), server.name
    kind = "chat.completion" if chat else "text_completion"
    run.submit()
    if stream:
        return StreamingResponse(
            _stream(run, run_id, created, model, chat, usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    watcher = asyncio.create_task(_watch_disconnect(request, run))
    try:
        async for _ in run.updates():
            pass
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    except EngineFailed as err:
        raise ApiError(500, str(err), kind="server_error") from None
    except EngineUnavailable as gone:
        raise ApiError(503, str(gone), kind="server_error") from None
    finally:
        watcher.cancel()
    choices = []
    for index, text in enumerate(run.texts):
        text.delta(final=True)
        choice: dict[str, Any] = {"index": index, "finish_reason": run.finished[index], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text.text}
        else:
            choice["text"] = text.text
        choices.append(choice)
    body = {"id": run_id, "object": kind, "created": created, "model": model, "choices": choices, "usage": run.usage()}
    return JSONResponse(body)


async def _stream(run: _Run, run_id: str, created: int, model: str, chat: bool, usage: bool) -> AsyncIterator[str]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    indices = range(len(run.sequences))

    def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
        if chat:
            delta = {"content": text} if text else {}
            return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}

    try:
        if chat:  # the role first, as OpenAI's stream does
            role = {"role": "assistant", "content": ""}
            yield _chunk(
                kind, run_id, created, model, [{"index": i, "delta": role, "finish_reason": None} for i in indices]
            )
        try:
            async for changed in run.updates():
                for index in sorted(changed):  # a chunk per token, its text empty while held back
                    finish = run.finished.get(index)
                    text = run.texts[index].delta(final=finish is not None)
                    if text or finish is None:
                        yield _chunk(kind, run_id, created, model, [choice(index, text, None)])
                    if finish is not None:
                        yield _chunk(kind, run_id, created, model, [choice(index, "", finish)])
        except (EngineFailed, EngineUnavailable) as err:
            status = 503 if isinstance(err, EngineUnavailable) else 500
            error = ApiError(status, str(err), kind="server_error").body()
            yield f"data: {json.dumps(error)}\n\n"
        if usage:
            yield _chunk(kind, run_id, created, model, [], usage=run.usage())
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnected and the response task was cancelled
        run.cancel()


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """Wait for the client to close the connection (the body is read already), then cancel."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.client_gone()
            return


class _CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (it passes ``receive``
    through untouched, so streamed responses still see a disconnect)."""

    def __init__(self, app: ASGIApp, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            self.metrics.requests.labels(path if path in ENDPOINTS else "other", str(status[0])).inc()


def create_app(llm: LLM, config: ServeConfig, name: str | None = None) -> FastAPI:
    """The server's ASGI app over ``llm`` in this process. Builds the batcher (and its cache) now;
    its loop runs in a thread while the app is up."""
    return create_engine_app(ThreadEngine(llm, config), name)


def create_engine_app(engine: Engine, name: str | None = None) -> FastAPI:
    """The server's ASGI app over a built engine; its loop is started and stopped with the app
    (its lifespan)."""
    server = _Server(engine, name)
    config = server.config

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="kvpr", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, validation_message(list(err.errors()))).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:  # never a traceback to the client
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        return JSONResponse(ApiError(500, f"internal error: {message}", "server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        why = engine.down()
        if why is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine stopped", "reason": why}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        await engine.refresh_metrics()
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "kvpr"}
        return {"object": "list", "data": [{**card, "max_model_len": config.max_model_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        prompts = [server.encode(prompt) for prompt in body.prompts()]
        run = _Run(server, prompts, body, body.max_tokens or 16)
        usage = body.stream_options is not None and body.stream_options.include_usage
        return await _answer(server, request, run, chat=False, stream=body.stream, usage=usage)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        run = _Run(server, [server.chat_prompt(body)], body, body.token_limit())
        usage = body.stream_options is not None and body.stream_options.include_usage
        return await _answer(server, request, run, chat=True, stream=body.stream, usage=usage)

    app.add_middleware(_CountRequests, metrics=server.metrics)
    return app
