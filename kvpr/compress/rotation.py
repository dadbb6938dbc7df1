"""The normalized Walsh-Hadamard rotation over the head dimension, applied before quantisation.

``H = H_d / sqrt(d)`` (Sylvester order) is orthogonal and symmetric, so it is its own inverse and
keeps every token's L2 norm: an outlier channel is spread evenly over all ``d`` channels, which
narrows the per-token range a quantiser has to cover (QuaRot, SpinQuant, the 3-4-bit KV quantisers
built on them). A codec that rotates at encode un-rotates after dequantising at decode, so the K,V
it returns are in the model's basis and attention needs no change (rotating Q instead would save
the inverse transform but tie the codec to the attention kernel).
"""

from __future__ import annotations

import torch

from kvpr.errors import KvprError

ROTATIONS: tuple[str, ...] = ("none", "k", "v", "kv")  # which of K, V a codec rotates


def check_rotation(rotate: str, d: int | None = None) -> str:
    """``rotate`` if it is one of ``ROTATIONS`` (and ``d`` a power of two where it rotates anything)."""
    if rotate not in ROTATIONS:
        raise KvprError(f"rotate={rotate!r}: use one of {', '.join(ROTATIONS)}")
    if d is not None and rotate != "none" and (d <= 0 or d & (d - 1)):
        raise KvprError(f"a Hadamard rotation needs a power-of-two head_dim, not {d}: use rotate=none")
    return rotate


class Rotated:
    """What a codec setting's ``rotate`` (one of ``ROTATIONS``) says it rotates: K, V or both."""

    rotate: str

    @property
    def rotates_k(self) -> bool:
        return "k" in self.rotate

    @property
    def rotates_v(self) -> bool:
        return "v" in self.rotate


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last dim (fast transform: ``log2(d)`` butterfly passes), in float32.

    Args:
        x: [..., d] with ``d`` a power of two, any float dtype.
    Returns:
        float32 [..., d]; ``hadamard(hadamard(x)) == x`` up to float32 rounding.
    """
    d = x.shape[-1]
    check_rotation("k", d)
    shape = x.shape
    y = x.float().reshape(-1, d)
    half = 1
    while half < d:
        pairs = y.view(-1, d // (2 * half), 2, half)  # [rows, blocks, 2, half]: element j and j + half
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2).view(-1, d)
        half *= 2
    return y.mul_(d**-0.5).reshape(shape)


def hadamard_matrix(d: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalized ``[d, d]`` matrix ``H`` (what :func:`hadamard` multiplies by), for kernels and tests."""
    return hadamard(torch.eye(d, device=device)).to(dtype)
