"""Throughput mode's configuration (FlexGen's setting): where weights, cache and activations live
(``--percent wg wc cg cc hg hc``) and the block of GPU batches the block schedule runs."""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvpr.errors import KvprError


def _percent(value: float, what: str) -> float:
    if not (0.0 <= value <= 100.0) or math.isnan(value):
        raise KvprError(f"--percent: {what}={value} must lie in [0, 100]")
    return float(value)


class Tier(str, enum.Enum):
    """Where a tensor lives in throughput mode."""

    GPU = "gpu"
    CPU = "cpu"
    DISK = "disk"


def tier_at(percentile: float, gpu_percent: float, cpu_percent: float) -> Tier:
    """The tier holding ``percentile`` when the GPU, CPU and disk shares are laid end to end
    (FlexGen's ``get_choice``: strictly below the running total)."""
    if percentile < gpu_percent:
        return Tier.GPU
    if percentile < gpu_percent + cpu_percent:
        return Tier.CPU
    return Tier.DISK


@dataclass(frozen=True)
class CacheSplit:
    """Slots of each cache tier for a cache of ``max_len`` slots: ``[0, gpu)``, ``[gpu, gpu + cpu)``,
    and the rest on disk (percentages rounded to whole slots)."""

    max_len: int
    gpu: int
    cpu: int

    @classmethod
    def of(cls, max_len: int, gpu_percent: float, cpu_percent: float) -> "CacheSplit":
        gpu_end = min(max_len, math.floor(max_len * gpu_percent / 100 + 0.5))  # halves round up
        cpu_end = min(max_len, math.floor(max_len * (gpu_percent + cpu_percent) / 100 + 0.5))
        return cls(max_len, gpu_end, cpu_end - gpu_end)

    @property
    def disk(self) -> int:
        return self.max_len - self.gpu - self.cpu

    def ranges(self, length: int) -> tuple[int, int, int]:
        """How many of the first ``length`` slots lie on the GPU, CPU and disk tiers."""
        on_gpu = min(length, self.gpu)
        on_cpu = min(length, self.gpu + self.cpu) - on_gpu
        return on_gpu, on_cpu, length - on_gpu - on_cpu


@dataclass(frozen=True)
class Placement:
    """Where weights, KV cache and activations live in throughput mode, as FlexGen's
    ``--percent wg wc cg cc hg hc``: the percentage on the GPU and on the CPU, the rest on disk.

    Weights are split per layer by FlexGen's rule (each tensor goes to the tier holding the middle
    of its byte range); the cache is split by token ranges (the oldest ``cg``% of slots on the GPU,
    the next ``cc``% on the CPU, the newest on disk), so any chunk that is copied stays one
    contiguous block; activations go to the tier holding their 50th percentile, as in FlexGen.
    """

    weights_gpu: float = 100.0
    weights_cpu: float = 0.0
    cache_gpu: float = 0.0
    cache_cpu: float = 100.0
    act_gpu: float = 100.0
    act_cpu: float = 0.0

    def __post_init__(self) -> None:
        for name, (gpu, cpu) in {
            "weights": (self.weights_gpu, self.weights_cpu),
            "cache": (self.cache_gpu, self.cache_cpu),
            "activations": (self.act_gpu, self.act_cpu),
        }.items():
            _percent(gpu, f"{name} on the GPU")
            _percent(cpu, f"{name} on the CPU")
            if gpu + cpu > 100.0 + 1e-9:
                raise KvprError(f"--percent: {name} on GPU ({gpu}) and CPU ({cpu}) add up to more than 100")

    @classmethod
    def parse(cls, values: Sequence[str | float]) -> "Placement":
        """Six numbers ``wg wc cg cc hg hc``, as FlexGen's ``--percent``."""
        if len(values) != 6:
            raise KvprError(f"--percent takes 6 numbers (wg wc cg cc hg hc), got {len(values)}")
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            raise KvprError(f"--percent {' '.join(map(str, values))}: use six numbers in [0, 100]") from None
        return cls(*numbers)

    @property
    def weights_disk(self) -> float:
        return max(0.0, 100.0 - self.weights_gpu - self.weights_cpu)

    @property
    def cache_disk(self) -> float:
        return max(0.0, 100.0 - self.cache_gpu - self.cache_cpu)

    @property
    def act_disk(self) -> float:
        return max(0.0, 100.0 - self.act_gpu - self.act_cpu)

    @property
    def uses_disk(self) -> bool:
        return any(share > 0 for share in (self.weights_disk, self.cache_disk, self.act_disk))

    def weight_tiers(self, sizes: Sequence[int]) -> list[Tier]:
        """The tier of each tensor of a layer (``sizes`` in elements, in parameter order): the one
        holding the middle of the tensor's byte range (FlexGen's rule)."""
        total, before, tiers = sum(sizes), 0, []
        for size in sizes:
            tiers.append(tier_at(100.0 * (before + size / 2) / total, self.weights_gpu, self.weights_cpu))
            before += size
        return tiers

    def cache_split(self, max_len: int) -> CacheSplit:
        return CacheSplit.of(max_len, self.cache_gpu, self.cache_cpu)

    @property
    def activation_tier(self) -> Tier:
        """Activations live where their 50th percentile falls (FlexGen's rule)."""
        return tier_at(50.0, self.act_gpu, self.act_cpu)

    def as_percent(self) -> tuple[float, float, float, float, float, float]:
        return (self.weights_gpu, self.weights_cpu, self.cache_gpu, self.cache_cpu, self.act_gpu, self.act_cpu)

    def __str__(self) -> str:
        return " ".join(f"{v:g}" for v in self.as_percent())


@dataclass(frozen=True)
class ThroughputConfig:
    """Throughput mode (FlexGen's setting): the placement and the block of GPU batches.

    A block is ``num_gpu_batches`` batches of ``gpu_batch_size`` sequences; the block schedule runs
    each layer for every batch of the block, so a layer's weights are loaded once per block.
    """

    placement: Placement = field(default_factory=Placement)
    gpu_batch_size: int = 4
    num_gpu_batches: int = 1
    offload_dir: str | None = None  # the disk tier; needed when the placement puts anything on disk
    pin_weight: bool = True  # CPU weights in pinned memory (faster copies, host memory locked)
    compress_weight: bool = False  # CPU and disk shares of the weights in 4-bit groups of 64 (FlexGen's)

    def __post_init__(self) -> None:
        if self.gpu_batch_size < 1:
            raise KvprError(f"--gpu-batch-size {self.gpu_batch_size}: must be >= 1")
        if self.num_gpu_batches < 1:
            raise KvprError(f"--num-gpu-batches {self.num_gpu_batches}: must be >= 1")
        p = self.placement
        if p.uses_disk and not self.offload_dir:
            raise KvprError(
                f"--percent {p} puts {p.weights_disk:g}% of weights, {p.cache_disk:g}% of the cache and "
                f"{p.act_disk:g}% of activations on disk: pass --offload-dir DIR for the disk tier"
            )

    @property
    def block_size(self) -> int:
        """Sequences per block: ``gpu_batch_size * num_gpu_batches``."""
        return self.gpu_batch_size * self.num_gpu_batches
