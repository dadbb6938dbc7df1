"""Throughput mode's memory as a run checks it before allocating: the same formula the plan used.

``memory_terms`` (``throughput_bytes``) is the one formula: the search's LP rows, ``estimate``'s check of
a rounded policy, and here, at the placement a run realises, the check ``LLM`` makes before it loads
the weights and before each block. The plan counts every item of the run's check and more (the
prompt's working set), against the same usable share of the same free memory, so a plan the search
returns always passes it.
"""

from __future__ import annotations

from collections.abc import Mapping

from kvpr.config import ModelConfig
from kvpr.errors import KvprError
from kvpr.scheduler.throughput_bytes import (
    GIB,
    NO_CODECS,
    CacheCodecs,
    ThroughputWorkload,
    block_sizes,
    memory_terms,
    realised_shares,
)
from kvpr.throughput_config import ThroughputConfig, Tier

# What a run allocates and keeps (checked before allocating); the prompt's working set, activations
# and logits are transient and sized by the prompt length, which only the plan knows: it counts them too.
RUN_ITEMS: tuple[tuple[Tier, tuple[str, ...]], ...] = (
    (Tier.GPU, ("resident weights", "layer weights", "weight buffers", "kv cache", "cache staging")),
    (Tier.CPU, ("layer weights", "kv cache")),
    (Tier.DISK, ("layer weights", "kv cache")),
)
_WEIGHT_ITEMS = ("resident weights", "layer weights")  # held once the model has loaded
_BUFFER_ITEMS = ("weight buffers",)  # held once the first block has run


def block_memory(
    model: ModelConfig,
    config: ThroughputConfig,
    batch_size: int,
    max_len: int,
    stores_x: bool,
    dtype_bytes: int,
    codecs: CacheCodecs = NO_CODECS,
) -> dict[Tier, dict[str, float]]:
    """Bytes per tier and item of a run of ``batch_size`` rows and ``max_len`` slots under ``config``:
    ``memory_terms`` at the realised placement, as ``estimate`` counts the plan. A partial block is
    ``ceil(batch_size / gbs)`` GPU batches; only the slots matter to ``RUN_ITEMS``, not the prompt's share."""
    gbs = min(batch_size, config.gpu_batch_size)
    workload = ThroughputWorkload(max(max_len - 1, 1), 1)
    num_gpu_batches = -(-batch_size // gbs)
    block = block_sizes(model, workload, gbs, num_gpu_batches, stores_x, dtype_bytes, codecs, config.compress_weight)
    return memory_terms(block, realised_shares(model, config.placement, workload, 0.0))


def run_needs(
    memory: Mapping[Tier, Mapping[str, float]], weights_loaded: bool, buffers_made: bool
) -> dict[Tier, float]:
    """Bytes per tier a run has yet to allocate: its ``RUN_ITEMS`` less the weights once loaded and
    the two layer buffers once the first block made them."""
    held = (_WEIGHT_ITEMS if weights_loaded else ()) + (_BUFFER_ITEMS if buffers_made else ())
    return {tier: float(sum(memory[tier][item] for item in items if item not in held)) for tier, items in RUN_ITEMS}


def check_run_memory(needs: Mapping[Tier, float], free: Mapping[Tier, float], what: str) -> None:
    """Raise a KvprError naming the first tier in ``free`` (usable bytes, slack already taken off)
    whose need exceeds it. A pure function of sizes; the run's own check,
    ``kvpr.placement.check_block_fits``, calls it."""
    for tier, room in free.items():
        if needs[tier] > room:
            where = {Tier.GPU: "GPU memory", Tier.CPU: "host memory", Tier.DISK: "disk space"}[tier]
            raise KvprError(
                f"{what} needs {needs[tier] / GIB:.2f} GiB of {where} but only {max(room, 0.0) / GIB:.2f} GiB is "
                "free: lower --gpu-batch-size, --num-gpu-batches or the lengths, or the --percent share there"
            )
