"""FlexGen 0.1.8 as the throughput peer: its OPT benchmark run in-process, offline, numbers returned as JSON.

Why: kvpr's throughput claims are stated against FlexGen, so the peer must be FlexGen's own code, timed and
counted the way FlexGen reports it (``total throughput = generated tokens / (prefill + decode)``), on a GPU
host that reaches neither a package registry nor the Hugging Face hub. The script rebuilds
``flexgen.flex_opt.run_flexgen`` from its pieces (env, ``Policy``, ``OptLM``, warm-up, timed ``generate``) so
the numbers come back as values; ``--via-run-flexgen`` runs FlexGen's own ``run_flexgen`` and reads its log,
as a cross-check of that rebuild. One difference, for equal terms with kvpr: the warm-up runs at the timed
shape (the timed prompts, a prefill and a decode step), not FlexGen's 32-token prompts with one new token
(``--flexgen-warmup`` restores that); each result says which under ``warmup``.

Offline: weights are FlexGen's dummies (``_DUMMY_``: every weight is 1.0), and the tokenizer is a stand-in
(``StandInTokenizer``), because FlexGen's only use of it in a dummy run is ``get_test_inputs``.
Compatibility with torch 2.11 / transformers 5 / numpy 2: the default path (no compression, no CPU attention)
was read through and uses no removed API (no ``torch._six``, ``np.float``; transformers gives only
``AutoTokenizer``), so nothing in FlexGen is patched; the only monkeypatch is ``flex_opt.AutoTokenizer`` (hub
download), swapped for the stand-in, and only by ``--via-run-flexgen``, inside ``offline_tokenizer``.

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 benchmarks/bench_flexgen.py --model facebook/opt-6.7b --percent 0 100 0 100 0 100 \
        --gpu-batch-size 32 --num-gpu-batches 8 --prompt-len 256 --gen-len 32 --json flexgen.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import sys
import tempfile
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple
from unittest import mock

import torch

GB = 1 << 30
FLEXGEN_OFFLOAD_DIR = "~/flexgen_offload_dir"  # flex_opt.add_parser_arguments' default
WARMUP_PROMPT_LEN = 32  # run_flexgen warms up on 32-token prompts with max_new_tokens=1
WARMUP_NEW_TOKENS = 2  # this script's warm-up: the timed prompts, a prefill and one decode step


class Encoding(NamedTuple):
    input_ids: list[list[int]]
    attention_mask: list[list[int]]


class StandInTokenizer:
    """OPT's tokenizer as far as a dummy-weight FlexGen run sees it: left padding with pad id 1, a leading
    ``</s>`` (id 2), one id per word (FlexGen's prompt "Paris is the capital city of" should be one BPE token
    per word in OPT's vocabulary; the count changes no timing, attention is dense over all prompt_len keys).
    The left padding matters: OPT position ids count non-pad tokens only, which is why FlexGen can run a
    2048-token (mostly padding) prompt plus new tokens within OPT's 2050 learned positions."""

    pad_token_id = 1
    bos_token_id = 2
    eos_token_id = 2
    add_bos_token = True
    padding_side = "left"
    vocab_size = 50272
    _first_word_id = 4  # ids 0..3 are OPT's special tokens

    def __init__(self) -> None:
        self._word_ids: dict[str, int] = {}
        self._id_words: dict[int, str] = {}

    def _encode(self, text: str) -> list[int]:
        ids = [self.bos_token_id] if self.add_bos_token else []
        for word in text.split():
            if word not in self._word_ids:
                token_id = self._first_word_id + len(self._word_ids)
                assert token_id < self.vocab_size, "stand-in vocabulary exhausted"
                self._word_ids[word] = token_id
                self._id_words[token_id] = word
            ids.append(self._word_ids[word])
        return ids

    def _pad(self, ids: list[int], max_length: int) -> list[int]:
        pad = [self.pad_token_id] * max(0, max_length - len(ids))
        return pad + ids if self.padding_side == "left" else ids + pad

    def __call__(
        self, texts: str | Sequence[str], padding: bool | str = False, max_length: int | None = None, **_: Any
    ) -> Encoding:
        batch = [self._encode(text) for text in ([texts] if isinstance(texts, str) else texts)]
        if padding == "max_length":
            assert max_length is not None, "padding='max_length' needs max_length"
            width = max_length
        else:
            width = max(map(len, batch)) if padding else 0
        input_ids = [self._pad(ids, width) for ids in batch]
        mask = [[int(token != self.pad_token_id) for token in ids] for ids in input_ids]
        return Encoding(input_ids, mask)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        special = {self.pad_token_id, self.bos_token_id, 0, 3}
        kept = [int(token) for token in ids if not (skip_special_tokens and int(token) in special)]
        return " ".join(self._id_words.get(token, f"<{token}>") for token in kept)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


@contextlib.contextmanager
def offline_tokenizer(flex_opt: types.ModuleType) -> Iterator[StandInTokenizer]:
    """Within the block, ``flex_opt.AutoTokenizer.from_pretrained(...)`` returns the stand-in instead of
    downloading OPT's tokenizer. Only flex_opt's module attribute is swapped; transformers is untouched."""
    tokenizer = StandInTokenizer()
    stand_in = types.SimpleNamespace(from_pretrained=lambda *args, **kwargs: tokenizer)
    with mock.patch.object(flex_opt, "AutoTokenizer", stand_in):
        yield tokenizer


@dataclass(frozen=True)
class FlexGenCase:
    """One FlexGen run; fields mean what FlexGen's flags of the same names mean."""

    model: str
    percent: tuple[int, ...]  # six numbers, as FlexGen's --percent
    gpu_batch_size: int
    num_gpu_batches: int
    prompt_len: int
    gen_len: int
    pin_weight: bool = True
    overlap: bool = True
    offload_dir: str = FLEXGEN_OFFLOAD_DIR
    flexgen_warmup: bool = False  # FlexGen's own warm-up (32-token prompts, 1 new token), not the timed shape
    compress_weight: bool = False  # FlexGen's --compress-weight: 4-bit groups of 64 along dim 0
    compress_cache: bool = False  # FlexGen's --compress-cache: 4-bit groups of 64 along dim 2

    def __post_init__(self) -> None:
        assert len(self.percent) == 6, "percent takes six numbers: weight, cache, activations on GPU and CPU"
        assert self.gen_len >= 1 and self.prompt_len >= 1

    @property
    def num_prompts(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches


def _flex_opt() -> types.ModuleType:
    return importlib.import_module("flexgen.flex_opt")


def make_policy(flex_opt: types.ModuleType, case: FlexGenCase) -> Any:
    """FlexGen's Policy as run_flexgen builds it; the flags this script does not expose keep FlexGen's
    defaults: sep_layer on, cpu_cache_compute off, attn_sparsity 1.0; weight and cache compression as the
    case says (off by default, as in FlexGen)."""
    weight_4bit = flex_opt.CompressionConfig(num_bits=4, group_size=64, group_dim=0, symmetric=False)
    cache_4bit = flex_opt.CompressionConfig(num_bits=4, group_size=64, group_dim=2, symmetric=False)
    return flex_opt.Policy(
        case.gpu_batch_size,
        case.num_gpu_batches,
        *case.percent,
        case.overlap,
        True,  # sep_layer
        case.pin_weight,
        False,  # cpu_cache_compute
        1.0,  # attn_sparsity
        case.compress_weight,
        weight_4bit,
        case.compress_cache,
        cache_4bit,
    )


def _make_env(flex_opt: types.ModuleType, offload_dir: str) -> Any:
    gpu = flex_opt.TorchDevice("cuda:0")
    cpu = flex_opt.TorchDevice("cpu")
    disk = flex_opt.TorchDisk(offload_dir)
    return flex_opt.ExecutionEnv(gpu=gpu, cpu=cpu, disk=disk, mixed=flex_opt.TorchMixedDevice([gpu, cpu, disk]))


def warmup_shape(case: FlexGenCase) -> dict[str, int]:
    """What the warm-up generate runs: the timed prompts with a prefill and one decode step, so FlexGen,
    like kvpr, meets the timed shapes (allocator, kernels, its buffers) before the clock starts;
    FlexGen's own warm-up (32-token prompts, 1 new token: no decode step) with ``flexgen_warmup``."""
    if case.flexgen_warmup:
        return {"prompt_len": WARMUP_PROMPT_LEN, "new_tokens": 1}
    return {"prompt_len": case.prompt_len, "new_tokens": WARMUP_NEW_TOKENS}


def _timed_generate(flex_opt: types.ModuleType, model: Any, case: FlexGenCase) -> list[float]:
    """run_flexgen's measurement: one warm-up generate (``warmup_shape``), then the timed generate;
    FlexGen's global "generate" timer holds one cost per step (costs[0] is the prefill)."""
    tokenizer = StandInTokenizer()
    warm = warmup_shape(case)
    warmup_inputs = flex_opt.get_test_inputs(warm["prompt_len"], case.num_prompts, tokenizer)
    inputs = flex_opt.get_test_inputs(case.prompt_len, case.num_prompts, tokenizer)
    model.generate(warmup_inputs, max_new_tokens=warm["new_tokens"])
    flex_opt.timers("generate").reset()
    model.generate(inputs, max_new_tokens=case.gen_len)
    costs = list(flex_opt.timers("generate").costs)
    assert len(costs) == case.gen_len, f"expected one timed step per new token, got {len(costs)}"
    return costs


def summarize(costs: Sequence[float], case: FlexGenCase) -> dict[str, float]:
    """FlexGen's formulas (run_flexgen, no cut_gen_len): total throughput counts every generated token,
    the first included, over prefill + decode time; decode throughput counts gen_len - 1 tokens."""
    prefill_s, decode_s = costs[0], sum(costs[1:])
    total_s = prefill_s + decode_s
    return {
        "tokens_per_s": case.num_prompts * case.gen_len / total_s,
        "decode_tokens_per_s": case.num_prompts * (case.gen_len - 1) / max(decode_s, 1e-10),
        "prefill_tokens_per_s": case.num_prompts * case.prompt_len / prefill_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
    }


def _free() -> None:
    """Give back device memory and the pinned host blocks torch's host allocator keeps cached."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds only
    if host_empty_cache is not None and torch.cuda.is_available():
        host_empty_cache()


def _describe(flex_opt: types.ModuleType, case: FlexGenCase, method: str) -> dict[str, Any]:
    opt_config = flex_opt.get_opt_config(case.model)
    seq_len = case.prompt_len + case.gen_len
    return {
        "system": "flexgen",
        "flexgen_version": metadata.version("flexgen"),
        "method": method,
        "model": case.model,
        "prompt_len": case.prompt_len,
        "gen_len": case.gen_len,
        "batch_size": case.num_prompts,
        "policy": {
            "percent": list(case.percent),
            "gpu_batch_size": case.gpu_batch_size,
            "num_gpu_batches": case.num_gpu_batches,
            "pin_weight": case.pin_weight,
            "overlap": case.overlap,
            "sep_layer": True,
            "cpu_cache_compute": False,
            "compress_weight": case.compress_weight,
            "compress_cache": case.compress_cache,
        },
        "model_gb": opt_config.model_bytes() / GB,
        "cache_gb": opt_config.cache_bytes(case.num_prompts, seq_len) / GB,
        "hidden_gb": opt_config.hidden_bytes(case.num_prompts, seq_len) / GB,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "weights": "dummy (FlexGen _DUMMY_, all ones)",
        "tokenizer": "stand-in (no hub)",
        "warmup": warmup_shape(case) if method == "pieces" else {"prompt_len": WARMUP_PROMPT_LEN, "new_tokens": 1},
    }


def measure_case(case: FlexGenCase) -> dict[str, Any]:
    """Run one case with FlexGen's pieces; returns the description, FlexGen's numbers and per-step times."""
    flex_opt = _flex_opt()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    opt_config, policy = flex_opt.get_opt_config(case.model), make_policy(flex_opt, case)
    env = _make_env(flex_opt, case.offload_dir)
    model = None
    try:
        model = flex_opt.OptLM(opt_config, env, flex_opt.DUMMY_WEIGHT, policy)
        costs = _timed_generate(flex_opt, model, case)
        _, gpu_peak_mem = env.gpu.mem_stats()
    finally:
        env.close_copy_threads()
        del model  # OptLM.__del__ frees its weights
        _free()
    result = _describe(flex_opt, case, "pieces") | summarize(costs, case)
    return result | {"gpu_peak_mem_gb": gpu_peak_mem / GB, "step_s": costs}


def run_flexgen_case(
    model: str,
    percent: Sequence[int],
    gpu_batch_size: int,
    num_gpu_batches: int,
    prompt_len: int,
    gen_len: int,
    pin_weight: bool = True,
    overlap: bool = True,
    offload_dir: str | None = None,
    flexgen_warmup: bool = False,
) -> dict[str, Any]:
    """One FlexGen throughput run in this process (GPU memory is given back on return)."""
    case = FlexGenCase(
        model,
        tuple(int(share) for share in percent),
        gpu_batch_size,
        num_gpu_batches,
        prompt_len,
        gen_len,
        pin_weight,
        overlap,
        offload_dir or FLEXGEN_OFFLOAD_DIR,
        flexgen_warmup,
    )
    return measure_case(case)


def _flexgen_argv(case: FlexGenCase, log_file: str) -> list[str]:
    return [
        *("--model", case.model, "--path", "_DUMMY_", "--offload-dir", case.offload_dir),
        *("--percent", *map(str, case.percent)),
        *("--gpu-batch-size", str(case.gpu_batch_size), "--num-gpu-batches", str(case.num_gpu_batches)),
        *("--prompt-len", str(case.prompt_len), "--gen-len", str(case.gen_len)),
        *("--pin-weight", str(case.pin_weight), "--overlap", str(case.overlap), "--log-file", log_file),
    ]


def run_via_flexgen(case: FlexGenCase) -> dict[str, Any]:
    """FlexGen's own run_flexgen on the same case (its prints go to stderr); numbers read back from its log."""
    flex_opt = _flex_opt()
    parser = argparse.ArgumentParser()
    flex_opt.add_parser_arguments(parser)
    with tempfile.TemporaryDirectory() as log_dir:
        log_file = str(Path(log_dir) / "flexgen.log")
        args = parser.parse_args(_flexgen_argv(case, log_file))
        with offline_tokenizer(flex_opt), contextlib.redirect_stdout(sys.stderr):
            flex_opt.run_flexgen(args)
        logged = flex_opt.read_benchmark_log(log_file)
    _free()
    numbers = {
        "tokens_per_s": logged.total_throughput,
        "decode_tokens_per_s": logged.decode_throughput,
        "prefill_tokens_per_s": logged.prefill_throughput,
        "prefill_s": logged.prefill_latency,
        "decode_s": logged.decode_latency,
        "total_s": logged.total_latency,
    }
    return _describe(flex_opt, case, "run_flexgen log (3 decimals)") | numbers


def _str2bool(value: str | bool) -> bool:
    """FlexGen's str2bool: ``--overlap`` alone means true; ``--overlap false`` turns it off."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def parse_case(argv: Sequence[str] | None = None) -> tuple[FlexGenCase, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="facebook/opt-6.7b")
    parser.add_argument("--percent", nargs=6, type=int, default=[100, 0, 100, 0, 100, 0])
    parser.add_argument("--gpu-batch-size", type=int, default=4)
    parser.add_argument("--num-gpu-batches", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--pin-weight", type=_str2bool, nargs="?", const=True, default=True)
    parser.add_argument("--overlap", type=_str2bool, nargs="?", const=True, default=True)
    parser.add_argument("--offload-dir", default=FLEXGEN_OFFLOAD_DIR)
    parser.add_argument(
        "--flexgen-warmup", action="store_true", help="FlexGen's own warm-up (32-token prompts, 1 new token)"
    )
    parser.add_argument("--compress-weight", action="store_true", help="FlexGen's 4-bit weights (group 64)")
    parser.add_argument("--compress-cache", action="store_true", help="FlexGen's 4-bit K,V cache (group 64)")
    parser.add_argument("--json", type=Path, help="also write the result object to this file")
    parser.add_argument("--via-run-flexgen", action="store_true", help="run FlexGen's run_flexgen, read its log")
    args = parser.parse_args(argv)
    fields = {name: getattr(args, name) for name in FlexGenCase.__dataclass_fields__}
    return FlexGenCase(**fields | {"percent": tuple(args.percent)}), args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    case, args = parse_case(argv)
    result = run_via_flexgen(case) if args.via_run_flexgen else measure_case(case)
    text = json.dumps(result, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
