"""The optimizers lowbit offers, by name, with the sizes of their state (torch-free: the planner reads it).

    adamw              torch.optim.AdamW: float32 m and v, 8 bytes per trained parameter
    adamw_8bit         m, v as blockwise 8-bit codes (bitsandbytes' maps): 2 bytes + 2 float32 absmax per block
    paged_adamw        float32 state kept on the host, paged to the device under a byte budget
    paged_adamw_8bit   both

8-bit state uses blocks of ``BLOCK`` values; tensors under ``MIN_8BIT_SIZE`` elements keep float32 state.
A paged optimizer's default budget holds two pages of ``PAGE_ELEMS`` elements' state (double-buffered).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError

__all__ = ["OptimizerKind", "OPTIMIZERS", "BLOCK", "MIN_8BIT_SIZE", "PAGE_ELEMS", "check_optimizer"]

BLOCK = 256
MIN_8BIT_SIZE = 4096
PAGE_ELEMS = 1 << 20


@dataclass(frozen=True)
class OptimizerKind:
    state_bits: int    # 32 or 8
    paged: bool

    @property
    def state_bytes_per_param(self) -> float:
        return 8.0 if self.state_bits == 32 else 2 + 8 / BLOCK

    @property
    def element_bytes(self) -> int:
        """Bytes of state one element moves through the pager (m and v)."""
        return 8 if self.state_bits == 32 else 2

    def default_budget_bytes(self) -> int:
        return 2 * PAGE_ELEMS * self.element_bytes


OPTIMIZERS = {
    "adamw": OptimizerKind(32, False),
    "adamw_8bit": OptimizerKind(8, False),
    "paged_adamw": OptimizerKind(32, True),
    "paged_adamw_8bit": OptimizerKind(8, True),
}


def check_optimizer(name: str) -> OptimizerKind:
    if name not in OPTIMIZERS:
        raise LowbitError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]
