"""Bit packing: b-bit unsigned codes and boolean masks stored densely in uint8 tensors.

Packing is what turns a quantiser into real savings: a 2-bit code costs 2 bits in memory and on
PCIe, not a byte. Codes are packed along the last dimension, little end first (code ``j`` of a
byte sits in bits ``[j*b, (j+1)*b)``), so a byte never spans two rows. 3-bit codes go 8 to a
little-endian 24-bit word (code ``j`` in bits ``[3j, 3j+3)``), stored as 3 bytes, low byte first.
"""

from __future__ import annotations

import torch

from kvpr.errors import KvprError

PACK_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
_WORD3 = 8  # 3-bit codes per 24-bit word (3 bytes)


def _check_bits(bits: int) -> int:
    """Codes per byte (for 3 bits: codes per 3-byte word)."""
    if bits not in PACK_BITS:
        raise KvprError(f"cannot pack {bits}-bit codes: use one of {PACK_BITS} bits")
    return _WORD3 if bits == 3 else 8 // bits


def packed_len(length: int, bits: int) -> int:
    """Bytes that ``length`` codes of ``bits`` bits take along the packed dimension."""
    per_byte = _check_bits(bits)
    if bits == 3:
        return 3 * -(-length // _WORD3)
    return -(-length // per_byte)


def _pad_to(codes: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -codes.shape[-1] % multiple
    return torch.nn.functional.pad(codes, (0, extra)) if extra else codes


def _pack3(codes: torch.Tensor) -> torch.Tensor:
    """[..., n] 3-bit codes -> uint8 [..., 3 * ceil(n / 8)]: 8 codes per little-endian 24-bit word."""
    codes = _pad_to(codes, _WORD3).to(torch.int32)
    words = codes.shape[-1] // _WORD3
    codes = codes.reshape(*codes.shape[:-1], words, _WORD3)  # [..., words, 8]
    shifts = torch.arange(0, 3 * _WORD3, 3, dtype=torch.int32, device=codes.device)  # [8]
    word = (codes << shifts).sum(dim=-1, keepdim=True)  # [..., words, 1] (< 2**24: fields do not overlap)
    byte_shifts = torch.arange(0, 24, 8, dtype=torch.int32, device=codes.device)  # [3]
    out = (word >> byte_shifts) & 0xFF  # [..., words, 3]
    return out.to(torch.uint8).reshape(*codes.shape[:-2], 3 * words)


def _unpack3(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`_pack3`: uint8 [..., length]."""
    words = packed.shape[-1] // 3
    triples = packed.to(torch.int32).reshape(*packed.shape[:-1], words, 3)  # [..., words, 3]
    byte_shifts = torch.arange(0, 24, 8, dtype=torch.int32, device=packed.device)
    word = (triples << byte_shifts).sum(dim=-1, keepdim=True)  # [..., words, 1]
    shifts = torch.arange(0, 3 * _WORD3, 3, dtype=torch.int32, device=packed.device)
    codes = ((word >> shifts) & 7).to(torch.uint8)  # [..., words, 8]
    return codes.reshape(*packed.shape[:-1], _WORD3 * words)[..., :length]


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (each < 2**bits) along the last dim.

    Args:
        codes: integer tensor [..., n] with values in [0, 2**bits).
        bits: 1, 2, 3, 4 or 8.
    Returns:
        uint8 tensor [..., packed_len(n, bits)] (``ceil(n * bits / 8)``, or ``3 * ceil(n / 8)`` for
        3 bits); a partial last byte or word is zero-padded.
    """
    per_byte = _check_bits(bits)
    codes = codes.to(torch.uint8)
    if bits == 3:
        return _pack3(codes)
    if per_byte == 1:
        return codes.contiguous()
    length = codes.shape[-1]
    num_bytes = packed_len(length, bits)
    if num_bytes * per_byte != length:
        codes = torch.nn.functional.pad(codes, (0, num_bytes * per_byte - length))
    codes = codes.reshape(*codes.shape[:-1], num_bytes, per_byte)  # [..., n/per_byte, per_byte]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)  # [per_byte]
    # Fields do not overlap, so the sum of the shifted codes is their bitwise OR (< 256).
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


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
    if bits == 3:
        return _unpack3(packed, length)
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
