"""Megatron-style tensor parallelism: the process group, the per-rank model config and weight slices.

Rank r of N keeps query heads ``[r*n_q/N, (r+1)*n_q/N)``, its share of the KV heads, and columns
``[r*I/N, (r+1)*I/N)`` of the MLP's intermediate size; q/k/v, fc1, gate and up projections are
column-parallel, the attention output projection and the MLP's down projection (out_proj, o_proj,
fc2, down_proj) row-parallel, each followed by one all-reduce (sum) before the residual is added,
their biases added once after it. Embeddings, norms, the final norm and the LM head are replicated,
so every rank holds the full residual stream and computes the full logits: greedy and seeded sampling
pick the same token on every rank without a broadcast (an all-reduce leaves identical bytes on all).

Everything else (cache, tiers, executors, scheduler) works per rank through ``rank_config``: a
``ModelConfig`` whose head counts and intermediate size are the rank's share. The cache is sized
from it, so each rank stores its own K,V heads and a full copy of the layer inputs X (X is
replicated). The cost model thus sees the rank's K,V width against the full ``h``: recomputation
pays only where X is smaller than the rank's K,V share (``h < 2 * n_kv/N * d`` in bytes), which
rules it out sooner as N grows.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kvpr.config import CACHE_METHODS, EngineConfig, ModelConfig
from kvpr.errors import KvprError

if TYPE_CHECKING:
    from kvpr.models.base import DecoderModel

# Layers whose input features are split across ranks (HF checkpoint names, every supported family).
ROW_PARALLEL = ("out_proj", "o_proj", "fc2", "down_proj")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    group: Any = None  # a torch.distributed ProcessGroup; None: the default group


class RowParallelLinear(nn.Linear):
    """``y = sum over ranks of x_r W_r^T, plus b``: x [..., in/N] -> y [..., out], bias added once.

    A subclass of nn.Linear so parameter names stay the checkpoint's.
    """

    def __init__(self, linear: nn.Linear, group: Any) -> None:
        bias = linear.bias is not None
        super().__init__(linear.in_features, linear.out_features, bias=bias, device=linear.weight.device)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)  # [..., out]: this rank's partial sum
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out if self.bias is None else out + self.bias


def check_supported(config: EngineConfig) -> None:
    """Refuse, in one line, the engine settings tensor parallelism does not cover yet."""
    num = config.runtime.tensor_parallel
    if num == 1:
        return
    if config.throughput is not None:
        raise KvprError(f"--tensor-parallel {num} is not supported in throughput mode yet: use latency mode")
    if config.cache.kv_codec in CACHE_METHODS:
        raise KvprError(
            f"--tensor-parallel {num} is not supported with --kv-codec {config.cache.kv_codec} yet: "
            "use --kv-codec none, fp16, int8 or int4"
        )


def rank_config(cfg: ModelConfig, world_size: int) -> ModelConfig:
    """The model as one rank of ``world_size`` holds it: n_q/N query heads, the rank's KV heads and
    I/N intermediate columns. KV heads are split when N divides n_kv, and replicated (one per rank,
    the one its query heads read) when n_kv divides N."""
    if world_size == 1:
        return cfg
    n_q, n_kv, inter = cfg.num_q_heads, cfg.num_kv_heads, cfg.intermediate_size
    if n_q % world_size:
        raise KvprError(
            f"num_attention_heads={n_q} is not divisible by --tensor-parallel {world_size}: use a divisor of {n_q}"
        )
    if n_kv % world_size and world_size % n_kv:
        raise KvprError(
            f"num_key_value_heads={n_kv} neither divides nor is divisible by --tensor-parallel {world_size}: "
            f"use a divisor or multiple of {n_kv}"
        )
    if inter % world_size:
        raise KvprError(
            f"intermediate size {inter} is not divisible by --tensor-parallel {world_size}: use a divisor of it"
        )
    return dataclasses.replace(
        cfg,
        num_q_heads=n_q // world_size,
        num_kv_heads=max(1, n_kv // world_size),
        intermediate_size=inter // world_size,
    )


def setup(world_size: int, device: torch.device) -> tuple[TensorParallel | None, torch.device]:
    """Join (or find) the process group of ``world_size`` ranks; the device this rank computes on
    (``cuda:LOCAL_RANK`` for a CUDA run whose device names no index).

    The group is torch.distributed's default one, already initialised by the caller or made here
    from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): nccl on CUDA, gloo on
    the CPU.
    """
    if world_size == 1:
        return None, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        env = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        if not all(name in os.environ for name in env):
            raise KvprError(
                f"--tensor-parallel {world_size} needs a process group of {world_size} ranks: launch with "
                f"torchrun --nproc-per-node {world_size} (or initialise torch.distributed first)"
            )
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (device notes)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # A group still alive at interpreter exit can abort the process ("terminate called without
        # an active exception" from gloo's threads): the group made here is destroyed at exit.
        atexit.register(_destroy_group)
    if dist.get_world_size() != world_size:
        raise KvprError(
            f"--tensor-parallel {world_size} but the process group has {dist.get_world_size()} ranks: "
            f"launch {world_size} processes"
        )
    return TensorParallel(dist.get_rank(), world_size), device


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.barrier()  # no rank tears its connections down while another still uses them
        dist.destroy_process_group()


def parallelize(model: DecoderModel, tp: TensorParallel) -> None:
    """Make the row-parallel projections of a model built from ``rank_config`` all-reduce their
    output (on the meta device, before the weights load)."""
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        if attr in ROW_PARALLEL and isinstance(module, nn.Linear):
            setattr(model.get_submodule(parent_name), attr, RowParallelLinear(module, tp.group))


@dataclass(frozen=True)
class WeightShard:
    """Which slice of each full checkpoint tensor this rank keeps.

    A tensor whose local shape differs from the full one in one dim is cut there; the slice of
    ``full // local`` blocks taken is block ``rank * (full // local) // N``: block ``rank`` when
    the dim is split N ways, and the KV head a rank's query heads read when KV heads are replicated.
    """

    rank: int
    world_size: int
    full_shapes: dict[str, tuple[int, ...]]
    local_shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, full: DecoderModel, local: DecoderModel, tp: TensorParallel) -> "WeightShard":
        def shapes(model: DecoderModel) -> dict[str, tuple[int, ...]]:
            return {name: tuple(param.shape) for name, param in model.named_parameters()}

        return cls(tp.rank, tp.world_size, shapes(full), shapes(local))

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self.full_shapes[name]

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full tensor ``name`` (others, e.g. of a mismatched checkpoint,
        pass through for the loader's shape check)."""
        full, local = self.full_shapes.get(name), self.local_shapes.get(name)
        if full is None or local is None or full == local or tuple(tensor.shape) != full:
            return tensor
        (dim,) = [axis for axis, (f, n) in enumerate(zip(full, local)) if f != n]
        blocks = full[dim] // local[dim]
        assert blocks * local[dim] == full[dim], (name, full, local)
        start = (self.rank * blocks // self.world_size) * local[dim]
        return tensor.narrow(dim, start, local[dim]).clone(memory_format=torch.contiguous_format)
