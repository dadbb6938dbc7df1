"""Where a run's bytes go and whether they fit, decided before anything is allocated.

``LLM`` asks here: which codec its host tier stores, whether X is kept beside K,V, is the context
within the model's positions, do the weights and a batch's cache (or a throughput block on its tiers)
fit free memory, how many tokens stay GPU-resident, what share of the CPU tier throughput mode
recomputes, and which throughput policy suits this machine. Functions of configs and sizes; the engine
passes itself as a frozen ``Target``, so nothing here holds state.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvpr.cache.disk import check_offload_dir
from kvpr.cache.storage import CacheShape, tier_codec
from kvpr.config import CACHE_METHODS, RECOMPUTE_AUTO, CacheConfig, EngineConfig, ModelConfig, Offload
from kvpr.device import (
    DEVICE_FILL,
    GIB,
    check_device_memory,
    check_host_memory,
    element_size,
    free_device_bytes,
    host_memory_limit,
    resolve_device,
    resolve_dtype,
)
from kvpr.errors import KvprError
from kvpr.models.loader import resolve_source
from kvpr.runtime.compressed import CacheMethod, make_method
from kvpr.runtime.latency import RING_SLOTS, slot_tokens_for, x_slot_tokens_for
from kvpr.runtime.tiers import DEFAULT_FLUSH_BLOCK, TierPlan
from kvpr.scheduler.policy import recompute_may_run
from kvpr.scheduler.solver import resident_tokens
from kvpr.scheduler.throughput_memory import block_memory, check_run_memory, run_needs
from kvpr.throughput_config import ThroughputConfig, Tier

if TYPE_CHECKING:
    from kvpr.cache.codec import KVCodec, XCodec
    from kvpr.scheduler.throughput_bytes import CacheCodecs
    from kvpr.scheduler.throughput_cost import ThroughputPlan


def make_codec(cache: CacheConfig, model: ModelConfig) -> KVCodec | CacheMethod | None:
    """The codec of the host tier (None: K,V as computed), or the cache method (KVO, KIVI, H2O,
    StreamingLLM, Quest) the compressed executor runs. Raises for names the tier cannot hold."""
    if cache.kv_codec in CACHE_METHODS:
        return make_method(cache, model)
    return tier_codec(cache.kv_codec, model.head_dim)


@dataclass(frozen=True)
class Target:
    """One engine as the checks size it: the model (``name`` for messages), the device and dtype it
    runs in, its cache placement with the codecs that store K,V and X, and the stated host budget
    (``--host-memory-gib``; None: the OS's available memory) and GPU budget (``--gpu-memory-gib``)."""

    model: ModelConfig
    name: str
    device: torch.device
    dtype: torch.dtype
    cache: CacheConfig
    codec: KVCodec | CacheMethod | None
    x_codec: XCodec | None
    host_memory_gib: float | None
    gpu_memory_gib: float | None = None  # what kvpr may use on the GPU, weights included (None: all free)
    flush_block: int = DEFAULT_FLUSH_BLOCK  # tokens of the GPU tail flushed to the host at once

    def stores_inputs(self) -> bool:
        """Keep X beside K,V only where recomputation may run and can pay (see recompute_may_run)."""
        codec = None if isinstance(self.codec, CacheMethod) else self.codec  # methods never recompute
        return self.cache.stores_inputs and recompute_may_run(self.cache, self.model, self.dtype, codec, self.x_codec)


def check_context(target: Target, max_len: int) -> None:
    """Raise a KvprError if ``max_len`` positions exceed the model's (or its sliding window's)."""
    cfg = target.model
    limit = cfg.max_position if cfg.sliding_window is None else min(cfg.max_position, cfg.sliding_window)
    if max_len > limit:
        raise KvprError(
            f"prompt + new tokens need {max_len} positions but {target.name} supports {limit}: "
            "shorten the prompt or lower --max-new-tokens"
        )


THROUGHPUT_CODECS: tuple[str, ...] = ("none", "int8", "int4")  # tokenwise: any token range of a tier is a slice


def check_throughput_cache(cache: CacheConfig) -> None:
    """Throughput mode's tiers store K,V and X as computed or under a tokenwise group codec (int8,
    int4): refuse the cache methods (KVO, KIVI, H2O, ...) and other codecs before anything is built."""
    if cache.kv_codec in CACHE_METHODS:
        raise KvprError(
            f"--kv-codec {cache.kv_codec} is a cache method, not supported in throughput mode yet: "
            "use --kv-codec int8|int4 or drop --percent"
        )
    for flag in ("kv_codec", "x_codec"):
        name = getattr(cache, flag)
        if name not in THROUGHPUT_CODECS:
            raise KvprError(
                f"--{flag.replace('_', '-')} {name} is not supported in throughput mode: use none, int8 or int4"
            )


def cache_bytes(target: Target, shape: CacheShape, pending_bytes: int = 0) -> tuple[int, int, str]:
    """(device bytes, host bytes, what) of a latency-mode batch of ``shape``: its cache on its tiers
    (the GPU tier and the rings of an offloaded one, the host tier); ``pending_bytes``: weights still
    to load, which the GPU tier's size leaves room for."""
    cache, codec = target.cache, target.codec
    what = f"the KV cache (b={shape.batch_size}, {shape.max_len} slots, {shape.num_layers} layers)"
    if isinstance(codec, CacheMethod):
        device_bytes, host_bytes = codec.memory(shape, cache.offload is Offload.CPU)
        return device_bytes, host_bytes, what
    plan = tier_plan(target, shape, pending_bytes)
    if plan is None:
        return shape.kv_bytes(), 0, what
    device_bytes, host_bytes = tier_bytes(target, shape, plan)
    return device_bytes, host_bytes, f"{what}, {plan.gpu_slots} of its tokens on the GPU and its overflow on the host"


def check_cache_fits(target: Target, shape: CacheShape, weight_bytes: int, weights_loaded: bool = True) -> None:
    """Raise a KvprError, before allocating anything, if a latency-mode batch of ``shape`` cannot run
    here: ``cache_bytes`` against free memory and the stated budgets (``weights_loaded=False``:
    counting the model's ``weight_bytes`` too, before they load)."""
    check_context(target, shape.max_len)
    budget = target.host_memory_gib
    pending = 0 if weights_loaded else weight_bytes
    device_bytes, host_bytes, what = cache_bytes(target, shape, pending)
    if not weights_loaded:
        device_bytes, what = device_bytes + weight_bytes, f"{what} with the weights of {target.name}"
    if target.device.type != "cuda":  # one pool; a stated budget counts the loaded weights in it
        check_host_memory(device_bytes + host_bytes, what, budget, held=weight_bytes if weights_loaded else 0)
        return
    check_host_memory(host_bytes, what + " (its host share)", budget)
    check_device_memory(device_bytes, target.device, what, budget)
    if target.gpu_memory_gib is not None:
        allowed = usable_device_bytes(target)  # device_bytes counts the weights when they are pending
        if device_bytes > allowed:
            raise KvprError(
                f"{what} needs {device_bytes / GIB:.2f} GiB of GPU memory but --gpu-memory-gib "
                f"{target.gpu_memory_gib:g} leaves {allowed / GIB:.2f} GiB after what kvpr holds: raise it, use "
                "--offload auto (or fewer --gpu-resident tokens), or lower --batch-size or the lengths"
            )


def check_block_fits(
    target: Target,
    throughput: ThroughputConfig,
    batch_size: int,
    max_len: int,
    weights_loaded: bool,
    buffers_made: bool,
    offload_dir: Callable[[], Path | None],
) -> None:
    """Raise a KvprError, before allocating, if a throughput block of ``batch_size`` rows does not fit
    its tiers (``weights_loaded=False``: with the weights, still to load; ``buffers_made``: the two GPU
    layer buffers already held). ``check_run_memory`` of the same ``block_memory`` the policy search
    plans with, against the same usable share of free memory; ``offload_dir`` is asked only when the
    block has a disk share."""
    check_context(target, max_len)
    if batch_size > throughput.block_size:
        raise KvprError(
            f"{batch_size} rows exceed the block of {throughput.num_gpu_batches} GPU batches of "
            f"{throughput.gpu_batch_size}: raise --num-gpu-batches or --gpu-batch-size"
        )
    memory = block_memory(
        target.model,
        throughput,
        batch_size,
        max_len,
        target.stores_inputs(),
        element_size(target.dtype),
        cache_codecs(target.cache),
    )
    needs, everything = run_needs(memory, weights_loaded, buffers_made), run_needs(memory, False, False)
    budget, device = target.host_memory_gib, target.device
    on_host = (Tier.CPU,) if device.type == "cuda" else (Tier.CPU, Tier.GPU)  # a CPU run: one pool
    held = sum(everything[tier] - needs[tier] for tier in on_host) if budget is not None else 0.0
    free = {Tier.CPU: host_memory_limit(budget) - held}  # a stated budget counts what is held
    if device.type == "cuda":
        free[Tier.GPU] = DEVICE_FILL * free_device_bytes(device)
    else:
        needs[Tier.CPU] += needs[Tier.GPU]
    what = f"a block of {batch_size} rows ({max_len} slots, --percent {throughput.placement})"
    what += "" if weights_loaded else f" with the weights of {target.name}"
    check_run_memory(needs, free, what)
    if needs[Tier.DISK]:
        check_offload_dir(offload_dir(), int(needs[Tier.DISK]), what + ": its disk share")  # type: ignore[arg-type]


def cache_codecs(cache: CacheConfig) -> CacheCodecs:
    """The codecs of throughput mode's CPU and disk tiers, as the cost model counts them."""
    from kvpr.scheduler.throughput_bytes import CacheCodecs

    return CacheCodecs(cache.kv_codec, cache.x_codec)


def check_before_loading(
    target: Target,
    throughput: ThroughputConfig | None,
    batch_size: int,
    max_len: int,
    weight_bytes: int,
    offload_dir: Callable[[], Path | None],
) -> None:
    """The check before the weights are built: they and the cache of a first batch of ``batch_size``
    rows (throughput mode: a block of at most that many, its K,V uncompressed) fit where the
    placement puts them. ``weight_bytes``: the model's, on the meta device, still to load."""
    if throughput is None:
        shape = CacheShape.for_model(target.model, batch_size, max_len, target.dtype)
        check_cache_fits(target, shape, weight_bytes, weights_loaded=False)
        return
    check_throughput_cache(target.cache)
    block = min(batch_size, throughput.block_size)
    check_block_fits(target, throughput, block, max_len, False, False, offload_dir)  # nothing loaded or made yet


def disk_tier_dir(throughput: ThroughputConfig | None, owner: object) -> Path | None:
    """A fresh directory for a disk tier under ``--offload-dir``, removed with ``owner`` (None: the
    placement has no disk tier)."""
    if throughput is None or not throughput.placement.uses_disk:
        return None
    root = check_offload_dir(throughput.offload_dir, 0, "the disk tier")  # type: ignore[arg-type]
    directory = Path(tempfile.mkdtemp(prefix="kvpr-", dir=root))
    weakref.finalize(owner, shutil.rmtree, directory, True)
    return directory


def usable_device_bytes(target: Target, pending_bytes: int = 0) -> int:
    """GPU bytes a cache may take now: the usable share of free memory, less ``pending_bytes``
    still to load, within ``--gpu-memory-gib`` (which counts what kvpr holds already, the weights)."""
    free = free_device_bytes(target.device) - pending_bytes
    if target.gpu_memory_gib is not None:
        held = torch.cuda.memory_allocated(target.device) + pending_bytes
        free = min(free, int(target.gpu_memory_gib * GIB) - held)
    return max(0, int(DEVICE_FILL * free))


def gpu_token_capacity(target: Target, shape: CacheShape, pending_bytes: int = 0) -> int:
    """Tokens whose K,V (every layer, the whole batch) an offloaded cache keeps on the GPU:
    ``--gpu-resident N``, or what fits (``auto``) after the rings and a workspace reserve."""
    wanted = target.cache.gpu_resident
    if wanted != "auto":
        return int(wanted)
    if target.device.type != "cuda":
        return 0  # no device memory apart from the host tier
    usable = usable_device_bytes(target, pending_bytes)
    reserve = tier_reserve_bytes(shape, usable)
    return resident_tokens(target.model, shape.batch_size, shape.max_len, usable, element_size(target.dtype), reserve)


def tier_reserve_bytes(shape: CacheShape, usable: int) -> int:
    """What an offloaded batch keeps free beyond its GPU tier out of ``usable`` device bytes: rings
    and recompute scratch, activations of a prefill and allocator slack."""
    return ring_bytes(shape) + usable // 10 + GIB


def usable_bytes_for_tokens(shape: CacheShape, tokens: int) -> float:
    """The usable device bytes under which ``gpu_token_capacity`` keeps ``tokens`` of ``shape``'s
    tokens on the GPU (its inverse: benchmarks emulate a GPU holding a given share of the cache).
    Half a token's bytes above the threshold, so the floor of the division lands on ``tokens``."""
    per_token = shape.kv_bytes() / shape.max_len  # K,V of one token: every layer, the whole batch
    return (tokens * per_token + ring_bytes(shape) + GIB) / 0.9 + per_token / 2


def tier_plan(target: Target, shape: CacheShape, pending_bytes: int = 0) -> TierPlan | None:
    """The GPU and host tiers of a latency-mode batch; None: the whole cache on the device.

    ``--offload none``: None. ``cpu``: the GPU keeps ``gpu_token_capacity`` tokens, the host the
    rest. ``auto``: None where the whole cache fits the GPU (or there is no GPU), else as ``cpu``.
    """
    offload = target.cache.offload
    if offload is Offload.NONE or (offload is Offload.AUTO and target.device.type != "cuda"):
        return None
    capacity = gpu_token_capacity(target, shape, pending_bytes)
    if offload is Offload.AUTO and capacity >= shape.max_len:
        return None
    return TierPlan.for_capacity(capacity, shape.max_len, target.flush_block)


def ring_bytes(shape: CacheShape, stores_x: bool = True) -> int:
    """Device bytes of an offloaded executor's rings and scratch (``runtime.latency``): a K,V ring
    of ``RING_SLOTS`` slots of up to ``SLOT_BYTES`` of K,V, an X ring of slots of up to
    ``SLOT_BYTES`` of X, and scratch for one slot's K,V (recomputed from X or decoded)."""
    per_token = 2 * shape.batch_size * shape.num_kv_heads * shape.head_dim * shape.element_size
    tokens = slot_tokens_for(shape, shape.max_len)
    x_per_token = shape.batch_size * shape.hidden_size * shape.element_size
    x_tokens = x_slot_tokens_for(shape, shape.max_len) if stores_x else 0
    return RING_SLOTS * (tokens * per_token + x_tokens * x_per_token) + max(tokens, x_tokens) * per_token


def tier_bytes(target: Target, shape: CacheShape, plan: TierPlan) -> tuple[int, int]:
    """(device, host) bytes of an offloaded batch under ``plan``: the GPU tier, the tail's X and the
    rings on the device; the host tier's K,V (as its codec stores them) and X."""
    gpu_share = shape.kv_bytes() * plan.gpu_slots // shape.max_len
    stores_x = target.stores_inputs() and plan.offloads
    tail_x = shape.x_bytes() * plan.tail_slots // shape.max_len if stores_x else 0
    device_bytes = gpu_share + tail_x + (ring_bytes(shape, stores_x) if plan.offloads else 0)
    host_kv = shape.kv_bytes(target.codec) * plan.host_slots // shape.max_len  # type: ignore[arg-type]
    host_x = shape.x_bytes(target.x_codec) * plan.host_slots // shape.max_len if stores_x else 0
    return device_bytes, host_kv + host_x


def recompute_fraction(
    target: Target, throughput: ThroughputConfig, profile_path: str | None
) -> Callable[[int], float]:
    """Throughput mode's recompute policy: context length -> fraction of the CPU tier recomputed
    (``profile_path``: the profile ``auto`` reads, measured here when absent)."""
    recompute = target.cache.recompute
    if not target.stores_inputs():
        return lambda context_len: 0.0
    if recompute != RECOMPUTE_AUTO:
        return lambda context_len: float(recompute)
    from kvpr.scheduler.profiler import load_or_measure
    from kvpr.scheduler.throughput_policy import recompute_fraction_policy

    profile = load_or_measure(target.device, target.model, target.dtype, throughput.gpu_batch_size, profile_path)
    dtype_bytes = element_size(target.dtype)
    return recompute_fraction_policy(target.model, profile, throughput, dtype_bytes, codecs=cache_codecs(target.cache))


def plan_throughput(
    config: EngineConfig,
    prompt_len: int,
    gen_len: int,
    allow_recompute: bool = True,
    gpu_memory_gib: float | None = None,
) -> ThroughputPlan:
    """Throughput mode's policy search for this machine: placement, GPU batch size, number of GPU
    batches and recompute fraction that maximise predicted tokens/s (``allow_recompute=False``:
    FlexGen's own search). Plans on a measured profile, or on ``--profile FILE`` and
    ``gpu_memory_gib`` on any machine. The plan fits the usable share (``DEVICE_FILL``) of the memory
    free before the weights load, counting every item the run's own check counts
    (``throughput_memory``), so the run accepts it."""
    from kvpr.cache.disk import measure_disk_bps
    from kvpr.scheduler.profile import HardwareProfile
    from kvpr.scheduler.profiler import load_or_measure
    from kvpr.scheduler.throughput_bytes import ThroughputWorkload
    from kvpr.scheduler.throughput_cost import MachineLimits
    from kvpr.scheduler.throughput_policy import search_policy

    model = resolve_source(config.model, dummy_weights=True).config
    runtime = config.runtime
    if runtime.profile_path is not None:
        profile = HardwareProfile.load(runtime.profile_path)
        dtype = resolve_dtype(profile.dtype, torch.device("cpu"))
    else:
        device = resolve_device(runtime.device)
        if device.type != "cuda":
            raise KvprError("the throughput policy plans for a GPU: run on one, or pass --profile FILE measured there")
        dtype = resolve_dtype(runtime.dtype, device)
        profile = load_or_measure(device, model, dtype, 1, progress=True)
    if gpu_memory_gib is not None:
        gpu_bytes = gpu_memory_gib * 2**30
    elif torch.cuda.is_available():
        gpu_bytes = float(free_device_bytes(torch.device("cuda")))  # the profiler's freed buffers count as free
    else:
        raise KvprError("no GPU here to read free memory from: state the target's with --gpu-memory-gib")
    this_machine = runtime.profile_path is None and gpu_memory_gib is None
    host = host_memory_limit(runtime.host_memory_gib, check_total=this_machine)
    offload_dir = config.throughput.offload_dir if config.throughput else None
    disk_bytes, disk_rates = 0.0, (1e9, 1e9)  # rates unused without a disk tier
    if offload_dir is not None:
        disk_rates = measure_disk_bps(offload_dir)
        disk_bytes = float(shutil.disk_usage(offload_dir).free) * 0.9
    limits = MachineLimits(DEVICE_FILL * gpu_bytes, host, disk_bytes, *disk_rates)
    return search_policy(
        model,
        profile,
        limits,
        ThroughputWorkload(prompt_len, gen_len),
        allow_recompute=allow_recompute,
        dtype_bytes=element_size(dtype),
        offload_dir=offload_dir,
        codecs=cache_codecs(config.cache),
        compress_weight=config.throughput.compress_weight if config.throughput else False,
    )


def with_throughput_plan(config: EngineConfig, plan: ThroughputPlan) -> EngineConfig:
    """``config`` running ``plan``: its placement and batches, its recompute fraction (the disk
    directory and weight pinning stay the user's)."""
    user = config.throughput or plan.config
    throughput = dataclasses.replace(
        plan.config, offload_dir=user.offload_dir, pin_weight=user.pin_weight, compress_weight=user.compress_weight
    )
    offload = Offload.NONE if throughput.placement.cache_gpu >= 100 else Offload.CPU
    # r = 0 is "off", not a fraction of 0: a fraction stores X, which the plan did not count
    recompute = plan.recompute_fraction if offload is Offload.CPU and plan.recompute_fraction > 0 else "off"
    return config.replace(
        throughput=throughput, cache=dataclasses.replace(config.cache, offload=offload, recompute=recompute)
    )
