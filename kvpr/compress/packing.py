"""Bit packing: b-bit unsigned codes and boolean masks stored densely in uint8 tensors.

Packing is what turns a quantiser into real savings: a 2-bit code costs 2 bits in memory and on
PCIe, not a byte. Codes are packed along the last dimension, little end first (code ``j`` of a
byte sits in bits ``[j*b, (j+1)*b)``), so a byte never spans two rows.
"""

from __future__ import annotations

import torch

from kvpr.errors import KvprError

PACK_BITS: tuple[int, ...] = (1, 2, 4, 8)


def _check_bits(bits: int) -> int:
    if bits not in PACK_BITS:
        raise KvprError(f"cannot pack {bits}-bit codes: use one of {PACK_BITS} bits")
    return 8 // bits


def packed_len(length: int, bits: int) -> int:
    """Bytes that ``length`` codes of ``bits`` bits take along the packed dimension."""
    per_byte = _check_bits(bits)
    return -(-length // per_byte)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2**bits) along the last dim.

    Args:
        codes: integer tensor [..., n] with values in [0, 2**bits).
        bits: 1, 2, 4 or 8.
    Returns:
        uint8 tensor [..., ceil(n * bits / 8)]; a partial last byte is zero-padded.
    """
    per_byte = _check_bits(bits)
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes.contiguous()
    length = codes.shape[-1]
    num_bytes = packed_len(length, bits)
    if num_bytes * per_byte != length:
        codes = torch.nn.functional.pad(codes, (0, num_bytes * per_byte - length))
    codes = codes.reshape(*codes.shape[:-1], num_bytes, per_byte)  # [..., n/per_byte, per_byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # [per_byte]
    # Fields do not overlap, so the sum of the shifted codes is their bitwise OR (< 256).
    return (codes << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`.

    Args:
        packed: uint8 tensor [..., ceil(length * bits / 8)].
        bits: the width the codes were packed with.
        length: number of codes to return along the last dim.
    Returns:
        uint8 tensor [..., length] of codes.
    """
    per_byte = _check_bits(bits)
    if packed.shape[-1] != packed_len(length, bits):
        raise KvprError(
            f"packed last dim {packed.shape[-1]} does not hold {length} {bits}-bit codes; "
            "pass the length the codes were packed with"
        )
    if per_byte == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [per_byte]
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # [..., bytes, per_byte]
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :length]


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask [..., n] 8 per byte into uint8 [..., ceil(n / 8)]."""
    return pack_bits(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: bool [..., length]."""
    return unpack_bits(packed, 1, length).bool()
