"""Tensor parallelism (kvpr.parallel) on the CPU: gloo ranks in spawned processes, each checked
against the single-process engine (greedy tokens equal, decode logits within 1e-5 in fp32).

One spawn per world size runs every case inside its workers, so process start-up is paid once.
"""

from __future__ import annotations

import os
import queue
import socket
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import cli_error_line, make_llm, teacher_forced, token_prompts
from kvpr.config import SamplingParams
from kvpr.errors import KvprError
from kvpr.models.registry import builtin_config
from kvpr.parallel import rank_config
from kvpr.scheduler.policy import recompute_can_pay

MODELS = ("opt", "llama-gqa")  # MHA; GQA with n_kv=2 (split at 2 ranks, replicated at 4)
# (offload, recompute, gpu_resident, dummy_weights, kv_codec, x_codec): resident, offloaded with
# recompute off, half and all of it, a GPU-resident prefix with the tail flushed in blocks of 4
# (make_llm's default), dummy weights (drawn full, then sliced), and int8 K,V and X on the host.
CASES = (
    ("none", "off", 0, False, "none", "none"),
    ("cpu", "off", 0, False, "none", "none"),
    ("cpu", 0.5, 0, False, "none", "none"),
    ("cpu", 1.0, 0, False, "none", "none"),
    ("cpu", 0.5, 2, False, "none", "none"),
    ("none", "off", 0, True, "none", "none"),
    ("cpu", 0.5, 0, False, "int8", "int8"),
)
ALL_CASES = [(model, index) for model in MODELS for index in range(len(CASES))]
# Four ranks share two CPU cores here (~6 ms per all-reduce): llama-gqa's replicated KV heads (one
# per rank) resident and offloaded with a GPU-resident prefix, and OPT half recomputed.
CASES_BY_WORLD = {2: ALL_CASES, 4: [("llama-gqa", 0), ("llama-gqa", 4), ("opt", 2)]}
PROMPTS = token_prompts([5, 9, 7])  # unequal lengths: left padding
NEW_TOKENS = 5
Results = dict[tuple[str, int], tuple[list[list[int]], torch.Tensor]]


def run_cases(directories: dict[str, str], keys: list[tuple[str, int]], tensor_parallel: int) -> Results:
    """Greedy tokens and teacher-forced logits [1 + NEW_TOKENS, b, V] of each (model, case index)."""
    results: Results = {}
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_on_eos=False)
    for model, index in keys:
        offload, recompute, resident, dummy, kv_codec, x_codec = CASES[index]
        llm = make_llm(
            directories[model], offload, recompute, gpu_resident=resident, dummy_weights=dummy,
            tensor_parallel=tensor_parallel, kv_codec=kv_codec, x_codec=x_codec,
        )  # fmt: skip
        tokens = [completion.token_ids for completion in llm.generate(PROMPTS, params)]
        ids, valid = llm._pad([prompt + new for prompt, new in zip(PROMPTS, tokens)])
        logits, executor = teacher_forced(llm, ids, valid, ids.shape[1] - NEW_TOKENS)
        executor.finish()
        results[(model, index)] = (tokens, logits)
    return results


def _worker(rank: int, world_size: int, port: int, directories: dict[str, str], out: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # numpy arrays travel by value (a torch tensor's shared memory dies with its worker)
        results: Any = {
            key: (tokens, logits.numpy())
            for key, (tokens, logits) in run_cases(directories, CASES_BY_WORLD[world_size], world_size).items()
        }
        try:  # a group of the wrong size is refused in one line
            make_llm(directories["opt"], tensor_parallel=4 if world_size == 2 else 2)
            mismatch = "no error"
        except KvprError as err:
            mismatch = str(err)
        out.put((rank, results, mismatch))
    except Exception:
        out.put((rank, traceback.format_exc(), ""))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(world_size: int, directories: dict[str, str]) -> dict[int, tuple[Any, str]]:
    context = mp.get_context("spawn")
    out = context.Queue()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers: 2-4 ranks share few cores
    port = _free_port()
    workers = [
        context.Process(target=_worker, args=(rank, world_size, port, directories, out)) for rank in range(world_size)
    ]
    for worker in workers:
        worker.start()
    answers: dict[int, tuple[Any, str]] = {}
    try:
        while len(answers) < world_size:
            rank, results, mismatch = out.get(timeout=120)
            answers[rank] = (results, mismatch)
            if isinstance(results, str):
                break  # a worker failed: the others may wait forever on a collective
    except queue.Empty:
        pass
    finally:
        for worker in workers:
            worker.join(timeout=10 if len(answers) == world_size else 0)
            if worker.is_alive():
                worker.kill()
    return answers


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Callable[[str], Path]) -> tuple[dict[str, str], Results]:
    directories = {model: str(tiny_checkpoint(model)) for model in MODELS}
    return directories, run_cases(directories, ALL_CASES, 1)


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_match_single_process(world_size: int, reference: tuple[dict[str, str], Results]) -> None:
    directories, expected = reference
    answers = _spawn(world_size, directories)
    failures = [results for results, _ in answers.values() if isinstance(results, str)]
    assert not failures, failures[0]
    assert sorted(answers) == list(range(world_size)), "a worker gave no answer"
    for rank, (results, mismatch) in answers.items():
        assert f"but the process group has {world_size} ranks: launch" in mismatch, mismatch
        for key in CASES_BY_WORLD[world_size]:
            (tokens, logits), (got_tokens, got_logits) = expected[key], results[key]
            assert got_tokens == tokens, (rank, key)
            where = f"rank {rank} {key}"
            torch.testing.assert_close(torch.from_numpy(got_logits), logits, atol=1e-5, rtol=1e-5, msg=where)


def test_one_line_errors(tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    llama, qwen = str(tiny_checkpoint("llama-gqa")), str(tiny_checkpoint("qwen2"))
    capsys.readouterr()  # the checkpoints' own output
    base = ["generate", "--prompt", "hi", "--device", "cpu", "--offload", "none", "--tensor-parallel"]
    cases = [
        (["2", "--model", llama], "needs a process group of 2 ranks: launch with torchrun --nproc-per-node 2"),
        (["3", "--model", llama], "num_attention_heads=4 is not divisible by --tensor-parallel 3"),
        (["3", "--model", qwen], "num_key_value_heads=2 neither divides nor is divisible"),
        (["2", "--kv-codec", "kvo", "--model", llama], "not supported with --kv-codec kvo"),
        (["2", "--mode", "throughput", "--model", llama], "not supported in throughput mode"),
        (["0", "--model", llama], "--tensor-parallel"),
    ]
    for flags, message in cases:
        assert message in cli_error_line(capsys, base + flags), flags
    serve = ["serve", "--model", llama, "--device", "cpu", "--tensor-parallel", "2"]
    assert "not supported by kvpr serve" in cli_error_line(capsys, serve)


def test_rank_config_drives_the_cost_model() -> None:
    """A rank's config holds its share of heads and MLP columns; X stays full-size, so the cost
    model sees a smaller K,V against the same X, and recomputation stops paying sooner."""
    llama = builtin_config("llama-3-8b")  # n_q 32, n_kv 8, I 14336
    split, replicated = rank_config(llama, 2), rank_config(llama, 16)
    assert (split.num_q_heads, split.num_kv_heads, split.intermediate_size) == (16, 4, 7168)
    assert (replicated.num_q_heads, replicated.num_kv_heads) == (2, 1)
    assert split.hidden_size == llama.hidden_size and split.head_dim == llama.head_dim
    opt = builtin_config("opt-6.7b")  # MHA: fp16 X is half of K,V on one GPU, as large as a rank's at 2
    assert recompute_can_pay(opt, 2, 2) and not recompute_can_pay(rank_config(opt, 2), 2, 2)
