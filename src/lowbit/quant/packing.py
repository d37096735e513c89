"""How k-bit codes lie in bytes (row-major order of the weight; the last group padded with ``pad``).

    4 bits: 2 codes per byte, the first in the high nibble           (bitsandbytes' layout, byte for byte)
    3 bits: 8 codes per 3 bytes: the big-endian 24-bit integer c0<<21 | c1<<18 | … | c7
    2 bits: 4 codes per byte, the first in the two highest bits

So NF3 takes 3 bits and NF2 2 bits of storage per weight (before the block constants). ``spec.PACKING`` is the
one table of these layouts (bits → codes per group, bytes per group), ``spec.packed_bytes`` their sizes.
"""

from __future__ import annotations

import torch

from .spec import PACKING

__all__ = ["pack_codes", "unpack_codes"]


def _shifts(bits: int, device) -> torch.Tensor:
    codes = PACKING[bits][0]
    return torch.arange(codes - 1, -1, -1, device=device, dtype=torch.int32) * bits


def pack_codes(codes: torch.Tensor, bits: int, pad: int = 0) -> torch.Tensor:
    """uint8 codes (any shape, read row-major) → packed uint8 of ``packed_bytes(n, bits)`` bytes."""
    per, nbytes = PACKING[bits]
    flat = codes.reshape(-1)
    spare = -flat.numel() % per
    if spare:
        flat = torch.cat([flat, flat.new_full((spare,), pad)])
    word = (flat.view(-1, per).to(torch.int32) << _shifts(bits, flat.device)).sum(1, dtype=torch.int32)
    if nbytes == 1:
        return word.to(torch.uint8)
    out = torch.stack([(word >> 8 * (nbytes - 1 - k)) & 0xFF for k in range(nbytes)], dim=1)
    return out.to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Packed bytes → the first ``n`` codes (uint8, flat)."""
    nbytes = PACKING[bits][1]
    groups = packed.reshape(-1).to(torch.int32).view(-1, nbytes)
    word = groups[:, 0]
    for k in range(1, nbytes):
        word = (word << 8) | groups[:, k]
    codes = (word[:, None] >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:n].to(torch.uint8)
