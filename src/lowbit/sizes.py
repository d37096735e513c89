"""Memory sizes as people write them: ``'48GB'``, ``'80GiB'``, ``'24000MB'`` (torch-free)."""

from __future__ import annotations

import re

from .errors import LowbitError

__all__ = ["GIB", "parse_size"]

GIB = 2**30


def parse_size(s: str | float | int) -> int:
    """'48GB' / '48GiB' / '80G' / '24000MB' / '1.5TB' → bytes (GB means GiB, as device vendors' tools show)."""
    if isinstance(s, (int, float)):
        if s <= 0:
            raise LowbitError(f"memory size must be positive, got {s}")
        return int(s * GIB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(s), re.I)
    if not m:
        raise LowbitError(f"cannot read memory size {s!r} (use e.g. 48GB, 80GiB, 24000MB)")
    val = float(m.group(1))
    unit = (m.group(2) or "G").upper().rstrip("B").rstrip("I") or "B"
    mult = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    if val <= 0:
        raise LowbitError(f"memory size must be positive, got {s!r}")
    return int(val * mult)
