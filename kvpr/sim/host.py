"""The host's share of a decode step: ops issued x seconds per op, against the device's share.

A decode step's host time is the number of host-side ops its executor path issues (host_ops.py
counts them on kvpr's own code) times one per-op cost of the machine and software stack, taken
from the host issue times ``kvpr profile`` measured on that machine (``host_layer_s``,
``host_chunk_s``) over the op counts of the very paths it timed. Machines of one kind differ: the
H200 sessions' probes give 24 and 43 us a launch with the same torch. The step's time is then how
the runtime overlaps host and device: without a host wait the token loop queues a step ahead, so
host issue and device work run side by side (``overlapped_s``: their max; no modelled path waits
for the device inside a step: KVO reads its selected rows in place, without the host).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """One measured host issue time and the op count of the path it timed."""

    seconds: float
    ops: int
    source: str  # "<profile file>: <field>"
    session: str = ""  # the results file measured on the same machine, in the same session


@dataclass(frozen=True)
class HostCost:
    """Seconds per host op on one machine and software stack: the median over ``probes`` of time
    per op (one constant for every row measured there; the median, as the probes scatter)."""

    op_s: float
    probes: tuple[Probe, ...]

    @classmethod
    def from_probes(cls, probes: list[Probe]) -> HostCost:
        if not probes or any(p.ops <= 0 or p.seconds < 0 for p in probes):
            raise ValueError("need probes with positive op counts and non-negative times")
        return cls(statistics.median(p.seconds / p.ops for p in probes), tuple(probes))

    def seconds(self, ops: float) -> float:
        return ops * self.op_s


def overlapped_s(host_s: float, device_s: float) -> float:
    """A step whose host never waits for the device: issue and execution overlap."""
    return max(host_s, device_s)
