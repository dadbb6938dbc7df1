"""The systems bench_latency runs, as a table, and one timed run of each kind.

A system name maps to a ``System``: who runs it (kvpr, transformers, or the cost model's floor), the
placement kvpr gets, and whose bytes its floor counts. Every timed run builds a fresh cache and
executor; warm-ups run at the timed shape (batch x prompt), so neither side pays first-call costs
(allocator growth, kernel choice, compilation) inside the figures.
"""

from __future__ import annotations

import dataclasses
import gc
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from floors import FloorKind
from torch.nn.attention import sdpa_kernel

from kvpr.config import CACHE_METHODS, CacheConfig, Offload, SamplingParams
from kvpr.models.common import ATTENTION_BACKENDS
from kvpr.models.registry import BUILTIN_CONFIGS
from kvpr.runtime.generation import generate_tokens

if TYPE_CHECKING:
    from bench_latency import Case
    from kvpr.api import LLM

# Decode intervals left out of decode ms/token (and of the floor's steps): on CUDA the token loop
# issues decode 0 before it reads the prefill's token, so the device is part-way through decode 0
# when its interval starts (by up to the host's issue time of a step: ~33 ms on llama-3-8b, which
# read 2-4% below the copy floor over 15 steps). Every later interval holds one whole step.
SKIPPED_STEPS = 1


@dataclass(frozen=True)
class System:
    """One column of the latency table."""

    runner: str  # "kvpr", "hf" (transformers) or "floor" (the cost model's plan, not timed)
    floor_kind: FloorKind
    recompute: str | float = "auto"  # kvpr: --recompute
    kv_codec: str = "none"  # kvpr: --kv-codec (tokenwise host tier, or a cache method)
    x_codec: str = "none"  # kvpr: --x-codec
    resident: int | str = 0  # kvpr: --gpu-resident
    compile: bool = False  # kvpr: --compile (KVO's fused decode)
    cuda_graph: bool = True  # kvpr: a resident-only step replayed as one CUDA graph (off: --no-cuda-graph)
    offloaded: bool = True  # the cache offloaded (kvpr: --offload cpu; transformers: its offloaded cache) or on the GPU

    @property
    def cache_method(self) -> bool:
        return self.kv_codec in CACHE_METHODS


_PLAN, _LINK = FloorKind.PLAN, FloorKind.LINK_BYTES
SYSTEMS: dict[str, System] = {
    "hf-gpu": System("hf", FloorKind.GPU_RESIDENT, offloaded=False),
    "hf-offloaded": System("hf", FloorKind.FP16_COPY_ALL),
    "kvpr-gpu": System("kvpr", FloorKind.GPU_RESIDENT, recompute="off", offloaded=False),  # --offload none
    "kvpr-gpu-eager": System("kvpr", FloorKind.GPU_RESIDENT, recompute="off", offloaded=False, cuda_graph=False),
    "kvpr-off": System("kvpr", _PLAN, recompute="off"),
    "kvpr-auto": System("kvpr", _PLAN),
    "kvpr-resident": System("kvpr", _PLAN, resident="auto"),  # auto split + as many tokens on the GPU as fit
    "kvpr-int8": System("kvpr", _PLAN, kv_codec="int8"),  # compressed host tier, split chosen by auto
    "kvpr-int4": System("kvpr", _PLAN, kv_codec="int4"),
    "kvpr-x4": System("kvpr", _PLAN, x_codec="int4"),  # X stored in 4 bits
    "kvpr-int4-x4": System("kvpr", _PLAN, kv_codec="int4", x_codec="int4"),
    "kvpr-kvo": System("kvpr", _LINK, recompute="off", kv_codec="kvo"),  # packed chunks, only the selected read
    "kvpr-kvo-compile": System("kvpr", _LINK, recompute="off", kv_codec="kvo", compile=True),
    "kvpr-kivi2": System("kvpr", _LINK, recompute="off", kv_codec="kivi2"),
    "kvpr-kivi4": System("kvpr", _LINK, recompute="off", kv_codec="kivi4"),  # the near-lossless 4-bit setting
    "floor": System("floor", FloorKind.PREDICTED),
}
DEFAULT_SYSTEMS = ("hf-gpu", "hf-offloaded", "kvpr-off", "kvpr-auto", "floor")


def system_named(name: str) -> System:
    """The table's entry, or ``kvpr-F``: a fixed recomputed fraction F of the offloaded tokens."""
    if name in SYSTEMS:
        return SYSTEMS[name]
    fixed = re.fullmatch(r"kvpr-([01](?:\.\d+)?)", name)
    if fixed is None:
        raise ValueError(f"unknown system {name!r}: use one of {', '.join(SYSTEMS)} or kvpr-<fraction>")
    return System("kvpr", _PLAN, recompute=float(fixed.group(1)))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Give back device memory and the pinned host blocks torch's host allocator keeps cached."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # CUDA builds only
        if host_empty_cache is not None:
            host_empty_cache()


# -- kvpr ---------------------------------------------------------------------------------------------


def placed_llm(llm: LLM, system: System) -> LLM:
    cache = CacheConfig(
        offload=Offload.CPU if system.offloaded else Offload.NONE,
        recompute=system.recompute,
        kv_codec=system.kv_codec,
        gpu_resident=system.resident,
        x_codec=system.x_codec,
    )
    runtime = dataclasses.replace(llm.config.runtime, compile=system.compile, cuda_graph=system.cuda_graph)
    return llm.with_placement(cache, runtime)


def _generate(placed: LLM, prompts: torch.Tensor, new_tokens: int) -> tuple[Any, Any]:
    """One batch through a fresh executor, as ``LLM.generate`` runs it: (output, executor)."""
    ids = prompts.to(placed.device)  # [b, prompt_len]
    valid = torch.ones_like(ids, dtype=torch.bool)
    executor = placed.make_executor(ids.shape[0], ids.shape[1] + new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False)
    with torch.inference_mode():
        output = generate_tokens(executor, ids, valid, params, ())
    return output, executor


def warm_kvpr(placed: LLM, system: System, prompts: torch.Tensor) -> None:
    """Two new tokens at the timed batch and prompt (with --compile: the first 512 prompt tokens at the
    timed batch, enough for KVO's chunk selection to reach its timed size, so it compiles here)."""
    warm = prompts[:, :512] if system.compile else prompts
    output, executor = _generate(placed, warm, 2)
    del output, executor
    free_memory()


def run_kvpr(placed: LLM, case: Case, prompts: torch.Tensor) -> dict[str, Any]:
    """One timed run: prefill, per-token decode and total time, the split of every step, and what the
    floor needs from the executor (its resident tokens; a cache method's counted bytes per step)."""
    output, executor = _generate(placed, prompts, case.gen_len)
    run: dict[str, Any] = {
        **_times(output.prefill_s, output.step_s),
        "recompute_lens": list(output.recompute_lens),
        "host_lens": list(output.host_lens),  # host-tier tokens per step: the rest stay on the GPU
    }
    if hasattr(executor, "step_bytes"):  # a cache method: bytes of its last step, all layers
        run["read_bytes_per_step"], run["link_bytes_per_step"] = executor.step_bytes()
    del output, executor
    return run


def _times(prefill_s: float, step_s: list[float]) -> dict[str, float]:
    """Prefill, the mean decode interval after the first ``SKIPPED_STEPS``, and the total to the last
    token (which no interval's cut can bias)."""
    steady = step_s[SKIPPED_STEPS:] or step_s
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": 1e3 * sum(steady) / len(steady),
        "first_step_ms": 1e3 * step_s[0],
        "total_s": prefill_s + sum(step_s),  # all gen_len new tokens
    }


def recompute_fraction(recompute_lens: list[int], host_lens: list[int]) -> float:
    """Mean share of the host tier's tokens recomputed from X per step (0 where the host is empty)."""
    shares = [recomputed / host if host else 0.0 for recomputed, host in zip(recompute_lens, host_lens)]
    return sum(shares) / max(1, len(shares))


def method_profile(llm: LLM, system: System, prompts: torch.Tensor, decode_ms: float, bandwidth: float) -> dict:
    """What one decode step of a cache method costs besides its time, measured on 4 steps.

    Per phase annotated with ``record_function("<codec>.<phase>")`` (KVO: select, fetch of the
    selected rows, decode, attend) its device and host time, and their device time as a share of the
    timed step; the host time of its parts (``<codec>_<part>.<what>``); the link bytes' time at
    ``bandwidth`` bytes/s; the host memory the cache allocated against an fp16 host cache.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    codec, steps = system.kv_codec, 4
    ids = prompts.to(llm.device)
    executor = placed_llm(llm, system).make_executor(ids.shape[0], ids.shape[1] + steps)
    executor.prefill(ids, torch.ones_like(ids, dtype=torch.bool))
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            executor.decode(ids[:, step])
        executor.finish()
    device_ms: dict[str, float] = {}
    host_ms: dict[str, float] = {}
    part_ms: dict[str, float] = {}
    for event in prof.events():  # host-side annotations: their device time is that of the kernels they launched
        if event.device_type == DeviceType.CPU and event.name.startswith(f"{codec}."):
            device_ms[event.name] = device_ms.get(event.name, 0.0) + event.device_time_total / 1e3 / steps
            host_ms[event.name] = host_ms.get(event.name, 0.0) + event.cpu_time_total / 1e3 / steps
        elif event.device_type == DeviceType.CPU and event.name.startswith(f"{codec}_"):
            part_ms[event.name] = part_ms.get(event.name, 0.0) + event.cpu_time_total / 1e3 / steps
    _, link = executor.step_bytes()
    host = executor.host_nbytes()
    cfg = llm.model_config
    fp16_host = 2 * cfg.num_layers * ids.shape[0] * (ids.shape[1] + steps) * cfg.kv_size * 2
    del executor
    return {
        "phase_device_ms": device_ms,
        "phase_host_ms": host_ms,
        "part_host_ms": part_ms,
        "method_device_share": sum(device_ms.values()) / decode_ms,
        "link_ms_per_step": 1e3 * link / bandwidth,
        "host_cache_bytes": host,
        "fp16_host_cache_bytes": fp16_host,
        "host_cache_share": host / fp16_host,
    }


# -- transformers ---------------------------------------------------------------------------------------


def hf_model(llm: LLM, name: str) -> torch.nn.Module:
    """transformers' model of the same architecture, wrapped around kvpr's weight tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**BUILTIN_CONFIGS[name])
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=llm.dtype)
    hf.load_state_dict(llm.model.state_dict(), strict=False, assign=True)
    backbone = getattr(hf, "model", None)
    if backbone is not None and hasattr(backbone, "rotary_emb"):  # buffers were made on meta
        backbone.rotary_emb = type(backbone.rotary_emb)(config=hf_config, device=llm.device)
    return hf.eval()


class _StepClock:
    """A logits processor that timestamps every generated token (after a device sync), so the
    peer's prefill and per-token decode times come from one generate call, like kvpr's."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync()
        self.stamps.append(time.perf_counter())
        return scores


def _hf_generate(hf: torch.nn.Module, system: System, prompts: torch.Tensor, new_tokens: int, **extra: Any) -> Any:
    ids = prompts.to(hf.device)
    cache = {"cache_implementation": "offloaded"} if system.offloaded else {}
    # The peer gets the same attention backends as kvpr: cuDNN's rebuilds a plan per context length
    # (milliseconds of CPU per call) and failed outright at b=16, s=2048 on torch 2.11.
    with torch.inference_mode(), sdpa_kernel(ATTENTION_BACKENDS):
        return hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **cache,
            **extra,
        )


def warm_hf(hf: torch.nn.Module, system: System, prompts: torch.Tensor) -> dict[str, Any]:
    """Two new tokens at the timed shape; for the offloaded cache, also what its host copies are: the
    layers it left on the host after the call, pinned or pageable (``Tensor.is_pinned``)."""
    out = _hf_generate(hf, system, prompts, 2, return_dict_in_generate=True)
    found: dict[str, Any] = {}
    if system.offloaded:
        layers = getattr(out.past_key_values, "layers", [])
        on_host = [layer.keys for layer in layers if getattr(layer, "keys", None) is not None]
        on_host = [keys for keys in on_host if not keys.is_cuda]
        pinned = sum(bool(keys.is_pinned()) for keys in on_host)
        kinds = {0: "pageable", len(on_host): "pinned"} if on_host else {0: "none on the host"}
        kind = kinds.get(pinned, "mixed")
        found = {
            "cache_copies": kind,
            "cache_copies_note": f"{len(on_host)} of {len(layers)} layers on the host after generate, {pinned} pinned; "
            "every step copies each layer's whole K,V to the host and back (DynamicCache offloading)",
        }
    del out
    free_memory()
    return found


def run_hf(hf: torch.nn.Module, system: System, case: Case, prompts: torch.Tensor) -> dict[str, Any]:
    """One timed generate call; per-token times from the logits processor's stamps."""
    from transformers import LogitsProcessorList

    clock = _StepClock()
    sync()
    start = time.perf_counter()
    _hf_generate(hf, system, prompts, case.gen_len, logits_processor=LogitsProcessorList([clock]))
    steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
    return _times(clock.stamps[0] - start, steps)  # the same intervals as kvpr's


def kv_fits_on_gpu(llm: LLM, case: Case) -> bool:
    if llm.device.type != "cuda":
        return True  # the CPU is its own device: the host tier and the "GPU" share one memory
    cfg = llm.model_config
    kv = 2 * cfg.num_layers * (case.prompt_len + case.gen_len) * case.batch_size * cfg.kv_size * 2
    free, _ = torch.cuda.mem_get_info()
    return kv * 1.3 + 4 * 2**30 < free
