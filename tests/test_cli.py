"""User errors end in one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli_error_line
from kvpr.cli import main

# opt-125m with random weights on the CPU: real shapes, no checkpoint needed.
DUMMY_BENCH = ["bench", "--model", "opt-125m", "--dummy-weights", "--device", "cpu"]


def test_missing_model_directory(capsys, tmp_path: Path) -> None:
    line = cli_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(tmp_path / "nope"), "--device", "cpu"])
    assert "not found" in line


def test_directory_without_config(capsys, tmp_path: Path) -> None:
    assert "no config.json" in cli_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(tmp_path)])


def test_malformed_config(capsys, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in cli_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(tmp_path)])


def test_unsupported_architecture(capsys, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    line = cli_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(tmp_path)])
    assert "unsupported architecture" in line and "gpt2" in line


def test_missing_weights(capsys, tiny_checkpoint, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_checkpoint("opt") / "config.json").read_text())
    assert "no *.safetensors" in cli_error_line(capsys, ["generate", "--prompt", "hi", "--model", str(tmp_path)])


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--recompute", "2"], "[0, 1]"),
        (["--recompute", "sometimes"], "use off, auto"),
        (["--offload", "gpu"], "--offload"),
        (["--offload", "none", "--recompute", "0.5"], "needs --offload cpu"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--dtype", "int3"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--num-chunks", "0"], "--num-chunks"),
        (["--num-chunks", "many"], "use auto or a chunk count"),
    ],
)
def test_bad_flag_values(capsys, tiny_checkpoint, flags: list[str], needle: str) -> None:
    argv = ["generate", "--prompt", "hi", "--model", str(tiny_checkpoint("opt")), "--device", "cpu", *flags]
    assert needle in cli_error_line(capsys, argv)


def test_prompt_longer_than_context(capsys) -> None:
    argv = DUMMY_BENCH + ["--prompt-len", "2040", "--gen-len", "16"]
    assert "supports 2048" in cli_error_line(capsys, argv)


def test_not_enough_host_memory_is_checked_before_allocating(capsys) -> None:
    argv = DUMMY_BENCH + ["--offload", "cpu", "--batch-size", "100000", "--prompt-len", "1024", "--gen-len", "8"]
    line = cli_error_line(capsys, argv)
    assert "GiB of host memory" in line and "--batch-size" in line


def test_builtin_config_needs_dummy_weights(capsys) -> None:
    assert "--dummy-weights" in cli_error_line(capsys, ["bench", "--model", "llama-3-8b"])


def test_bench_runs_on_dummy_weights(capsys) -> None:
    placement = ["--offload", "cpu", "--recompute", "0.5"]
    argv = DUMMY_BENCH + placement + ["--batch-size", "2", "--prompt-len", "16", "--gen-len", "4", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batch_size"] == 2 and len(report["step_ms"]) == 3
    # The 16 prompt tokens on the host, new ones in the GPU tail (64 tokens, not yet flushed).
    assert report["host_lens"] == [16, 16, 16] and report["recompute_lens"] == [8, 8, 8]
    assert report["decode_ms_per_token"] > 0 and report["prefill_s"] > 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--kv-codec", "kivi3"],
        ["--kv-codec", "kivi4", "--kivi4-rotate", "v", "--kivi4-residual", "64", "--offload", "cpu"],
    ],
)
def test_bench_runs_kivi3_and_kivi4(capsys, flags: list[str]) -> None:
    argv = DUMMY_BENCH + flags + ["--prompt-len", "140", "--gen-len", "3", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["offload"] == ("cpu" if "--offload" in flags else "auto")  # the default
    assert len(report["step_ms"]) == 2 and report["recompute_lens"] == [0, 0] and report["decode_ms_per_token"] > 0


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--kv-codec", "kivi4", "--kivi2-rotate", "v"], "--kivi2-rotate applies to --kv-codec kivi2, not kivi4"),
        (["--kv-codec", "kivi3", "--kivi3-rotate", "x"], "rotate='x': use one of none, k, v, kv"),
        (["--kv-codec", "kivi4", "--offload", "cpu", "--recompute", "0.5"], "is off for --kv-codec kivi4"),
    ],
)
def test_kivi_flag_errors(capsys, flags: list[str], needle: str) -> None:
    assert needle in cli_error_line(capsys, DUMMY_BENCH + flags)


@pytest.mark.parametrize("flags,graph", [([], True), (["--no-cuda-graph"], False)])
def test_cuda_graph_flag_reaches_the_runtime(flags: list[str], graph: bool) -> None:
    """CUDA graphs are on by default and ``--no-cuda-graph`` turns them off; on a CPU no executor
    captures a step either way."""
    import argparse

    from kvpr.api import LLM
    from kvpr.cli_engine import add_engine_flags, build_engine_config

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    config = build_engine_config(parser.parse_args(["--device", "cpu", *flags]))
    assert config.runtime.cuda_graph is graph
    assert LLM(config).make_executor(2, 16).graphs is None
