"""Lossless bit packing of small unsigned integer codes into a ``uint8`` byte stream.

Eight ``b``-bit codes (1 <= b <= 8) fill exactly ``b`` bytes, little-endian within the group,
so any bit width packs without waste apart from padding the last group of eight.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes used by :func:`pack_bits` for ``numel`` codes of ``bits`` bits."""
    return math.ceil(numel / 8) * bits


def _in_range(flat: torch.Tensor, bits: int) -> torch.Tensor:
    """Whether every code lies in ``[0, 2**bits)``, as a 0-d bool tensor (on the codes' device)."""
    lo, hi = torch.aminmax(flat)
    return (lo >= 0) & (hi < (1 << bits))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into bytes.

    Args:
        codes: integer tensor of any shape (flattened in row-major order).
        bits: code width, 1..8.
    Returns:
        ``uint8`` tensor of shape ``(ceil(numel / 8) * bits,)``.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and not bool(_in_range(flat, bits)):  # one host sync
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack into {bits} bits")
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * bits
    word = (groups << shifts).sum(dim=1)  # (G,) int64 holding 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, device=flat.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(1) >> byte_shifts) & 0xFF  # (G, bits)
    return out.to(torch.uint8).reshape(-1)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: returns ``numel`` codes as ``uint8`` (shape ``(numel,)``)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed buffer has {packed.numel()} bytes, expected {expected} for "
            f"{numel} codes of {bits} bits"
        )
    groups = packed.reshape(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (groups << byte_shifts).sum(dim=1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
