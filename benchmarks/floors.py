"""The floor of the plan that ran: no schedule can move a decode step's bytes and do its work faster.

Per decode step, each summed over the layers:

    PCIe     the bytes the row's plan copied host -> device (X of the recomputed tokens and the
             stored K,V of the copied ones, as their codecs store them; or a cache method's counted
             link bytes) / the best H2D bandwidth measured (any size, any repetition, any host memory)
    compute  (weights read by the step + K,V read by attention) / the best measured device-memory
             bandwidth  +  recompute FLOPs / the peak measured recompute rate (under the row's X codec)

    floor = max(PCIe, compute), the mean over the run's steps (as decode ms/token is).

The copy and compute streams overlap at best perfectly, across layers too, hence one max per step
(for identical layers, the same as a max per layer summed). Every term is a lower bound (peak rates,
bytes that must move at least once), so a timed row below its floor is a bug in the floor.
Hardware rates come from the run's profile; a profile without a device-memory bandwidth (format 3)
gives no floor rather than an invented constant.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from kvpr.config import ModelConfig
    from kvpr.scheduler.profile import HardwareProfile


class FloorKind(str, enum.Enum):
    """Whose bytes a row's floor counts (the ``floor_kind`` field of a results row)."""

    PLAN = "plan"  # kvpr's tokenwise host tier: its recompute lengths, codecs and resident tokens
    LINK_BYTES = "link-bytes"  # a cache method (KVO, KIVI): the executor's counted link and read bytes
    FP16_COPY_ALL = "fp16-copy-all"  # a peer with an offloaded cache: every token's fp16 K,V copied
    GPU_RESIDENT = "gpu-resident"  # a peer with the cache on the GPU: no PCIe, compute only
    PREDICTED = "predicted-fp16-plan"  # the `floor` row: the fp16 split the cost model picks (not timed)


class FloorUnavailable(Exception):
    """The profile lacks a rate the floor needs (the message names the fix)."""


@dataclass(frozen=True)
class FloorRates:
    """The best rates measured on the run's device (bytes/s, FLOP/s)."""

    h2d_bytes_per_s: float
    hbm_bytes_per_s: float
    recompute_flop_per_s: float

    @classmethod
    def from_profile(cls, profile: HardwareProfile, x_codec: str = "none") -> FloorRates:
        hbm = profile.hbm_bytes_per_s()
        if hbm is None:
            raise FloorUnavailable(
                "the profile has no device-memory bandwidth (format 3): re-run kvpr profile (bench: --reprofile)"
            )
        return cls(profile.h2d_best(), hbm, profile.recompute_curve(x_codec).peak)


@dataclass(frozen=True)
class StepWork:
    """What one decode step must do, all layers: bytes over the link, bytes read from device memory,
    FLOPs of the recompute."""

    link_bytes: float
    device_bytes: float
    recompute_flops: float = 0.0

    def floor_s(self, rates: FloorRates) -> float:
        copy_s = self.link_bytes / rates.h2d_bytes_per_s
        compute_s = self.device_bytes / rates.hbm_bytes_per_s + self.recompute_flops / rates.recompute_flop_per_s
        return max(copy_s, compute_s)


@dataclass(frozen=True)
class TokenBytes:
    """Bytes of one token in one layer, for all ``b`` rows of the batch, and the step's weight reads."""

    num_layers: int
    kv_stored: float  # K and V as the host tier stores them (codec parts, metadata included)
    x_stored: float  # X as stored for recomputation (under the X codec)
    kv_attended: float  # K and V in the model dtype, as attention reads them on the device
    recompute_flops: float  # [b, h] x [h, 2 * n_kv * d]: 2 * h FLOPs per output element
    weight_bytes: float  # every weight one decode step reads (decoder layers and LM head), all layers


def tokenwise_work(
    tokens: TokenBytes, prompt_len: int, recompute_lens: Sequence[int], host_lens: Sequence[int] | None = None
) -> list[StepWork]:
    """The steps of a tokenwise host-tier run: at step k, ``s = prompt_len + k`` tokens are cached,
    ``h_k`` of them on the host tier (``host_lens``; None: all ``s``) and the rest on the GPU tier;
    of the host's, the first ``l_k`` are recomputed from X and the others' K,V copied. Every cached
    token is attended on the device. (The GPU tail's flushes go device-to-host, the other direction
    of the link, and are not counted.)"""
    layers, steps = tokens.num_layers, []
    for step, recompute_len in enumerate(recompute_lens):
        context_len = prompt_len + step  # cached before this step's own token
        host_len = context_len if host_lens is None else host_lens[step]
        copied = host_len - recompute_len
        if copied < 0 or host_len > context_len:
            raise ValueError(f"step {step}: {recompute_len} recomputed of {host_len} host tokens, {context_len} cached")
        steps.append(
            StepWork(
                link_bytes=layers * (recompute_len * tokens.x_stored + copied * tokens.kv_stored),
                device_bytes=tokens.weight_bytes + layers * (context_len + 1) * tokens.kv_attended,
                recompute_flops=layers * recompute_len * tokens.recompute_flops,
            )
        )
    return steps


def copy_all_work(tokens: TokenBytes, prompt_len: int, num_steps: int) -> list[StepWork]:
    """Every cached token's K,V copied each step (``tokens`` in fp16, no codec): the peers' floor."""
    return tokenwise_work(tokens, prompt_len, [0] * num_steps)


def resident_work(tokens: TokenBytes, prompt_len: int, num_steps: int) -> list[StepWork]:
    """The cache on the GPU: nothing crosses the link."""
    return [
        StepWork(0.0, tokens.weight_bytes + tokens.num_layers * (prompt_len + step + 1) * tokens.kv_attended)
        for step in range(num_steps)
    ]


def counted_work(link_bytes: float, read_bytes: float, weight_bytes: float, num_steps: int) -> list[StepWork]:
    """A cache method's steps from its executor's counts per step (all layers): link bytes over PCIe,
    read bytes (anchors, selected rows, recent window, dense layers) from device memory."""
    return [StepWork(float(link_bytes), weight_bytes + float(read_bytes)) for _ in range(num_steps)]


def floor_ms(steps: Sequence[StepWork], rates: FloorRates) -> float:
    """Mean per-step floor in milliseconds."""
    if not steps:
        raise ValueError("no decode steps: a floor needs at least one")
    return 1e3 * sum(step.floor_s(rates) for step in steps) / len(steps)


def floor_fields(kind: FloorKind, steps: Sequence[StepWork], rates: FloorRates) -> dict[str, Any]:
    """What a results row records of its floor: the value, its kind, the rates and the mean bytes."""
    count = len(steps)
    return {
        "floor_ms": floor_ms(steps, rates),
        "floor_kind": kind.value,
        "floor_rates": asdict(rates),
        "floor_link_bytes_per_step": sum(s.link_bytes for s in steps) / count,
        "floor_device_bytes_per_step": sum(s.device_bytes for s in steps) / count,
        "floor_recompute_flops_per_step": sum(s.recompute_flops for s in steps) / count,
    }


def demonstrated_h2d(rows: Sequence[dict[str, Any]]) -> tuple[float, str] | None:
    """The best host-to-device rate a timed row of a run achieved, and which row: its plan's link
    bytes per step over its median step time. The link moved at least those bytes in that time, so
    the rate is a measurement of the link as much as the profiler's copies are (the runtime's
    back-to-back ring copies can beat the profiler's one-at-a-time copies by a few percent)."""
    best: tuple[float, str] | None = None
    for row in rows:
        link, ms = row.get("floor_link_bytes_per_step"), row.get("decode_ms_per_token")
        if not link or not ms or row.get("skipped") or not row.get("timed", True) or row.get("system") == "floor":
            continue
        rate = link / (ms / 1e3)
        if best is None or rate > best[0]:
            where = f"{row.get('model')} {row.get('batch_size')} x {row.get('prompt_len')} {row.get('system')}"
            fraction = row.get("gpu_fraction")
            best = (rate, where if fraction is None else f"{where} at GPU fraction {fraction}")
    return best


def floor_with_demonstrated_h2d(rows: list[dict[str, Any]]) -> None:
    """Re-floor every row of a run whose link rate the run itself beat (``demonstrated_h2d``): the
    floor's PCIe term divides by the better rate (``floor_h2d_source`` names the row; the profile's
    floor stays in ``floor_ms_profile_h2d``). The floor is recomputed from the row's mean bytes per
    step (``StepWork.floor_s``): never above the per-step floor it replaces."""
    best = demonstrated_h2d(rows)
    if best is None:
        return
    rate, source = best
    for row in rows:
        rates = row.get("floor_rates")
        if not rates or rate <= rates["h2d_bytes_per_s"] or row.get("floor_ms") is None:
            continue
        better = FloorRates(**{**rates, "h2d_bytes_per_s": rate})
        mean_step = StepWork(
            row["floor_link_bytes_per_step"],
            row["floor_device_bytes_per_step"],
            row.get("floor_recompute_flops_per_step") or 0.0,
        )
        row.setdefault("floor_ms_profile_h2d", row["floor_ms"])  # the first re-floor keeps the profile's
        row["floor_ms"] = floor_ms([mean_step], better)
        row["floor_rates"] = asdict(better)
        row["floor_h2d_source"] = f"demonstrated by {source}"


# -- kvpr's objects -> bytes (torch imported lazily: the arithmetic above runs anywhere) -------------


def decode_weight_bytes(model: torch.nn.Module, element: int) -> float:
    """Bytes of the weights one decode step reads: every decoder layer's and the LM head's."""
    layers = sum(p.numel() for layer in model.decoder_layers for p in layer.parameters())  # type: ignore[attr-defined]
    head = model.lm_head.weight.numel()  # type: ignore[union-attr]
    return float((layers + head) * element)


def token_bytes(
    model: ModelConfig,
    batch_size: int,
    dtype: torch.dtype,
    weight_bytes: float,
    kv_codec: str = "none",
    x_codec: str = "none",
) -> TokenBytes:
    """``TokenBytes`` of a tokenwise host tier (``--kv-codec none|int8|int4``, ``--x-codec``), sizes
    from the codecs' own ``bytes_per_token`` (what ``CacheShape.kv_bytes``/``x_bytes`` count)."""
    from kvpr.cache.codec import make_x_codec
    from kvpr.cache.storage import tier_codec
    from kvpr.device import element_size

    element = element_size(dtype)
    b, h, n_kv, d = batch_size, model.hidden_size, model.num_kv_heads, model.head_dim
    codec, x = tier_codec(kv_codec, d), make_x_codec(x_codec, h)
    fp16_kv = float(2 * b * n_kv * d * element)
    return TokenBytes(
        num_layers=model.num_layers,
        kv_stored=fp16_kv if codec is None else codec.bytes_per_token(b, n_kv, d),
        x_stored=float(b * h * element) if x is None else x.bytes_per_token(b, h),
        kv_attended=fp16_kv,
        recompute_flops=float(b * 2 * h * 2 * n_kv * d),
        weight_bytes=weight_bytes,
    )


def main() -> None:
    """``python benchmarks/floors.py --demonstrated RESULTS.json``: re-floor a run's rows in place
    with the link rate it demonstrated (for results written before the benches did it themselves)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--demonstrated", type=Path, required=True)
    path = parser.parse_args().demonstrated
    result = json.loads(path.read_text())
    floor_with_demonstrated_h2d(result["rows"])
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
