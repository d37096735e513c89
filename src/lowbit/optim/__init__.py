"""Optimizers by name: ``adamw_8bit``, ``paged_adamw``, ``paged_adamw_8bit`` (plain ``adamw`` is torch's)."""

from .paged import AdamW, PagerStats

__all__ = ["AdamW", "PagerStats", "make", "NAMES"]

NAMES = {"adamw": (32, False), "adamw_8bit": (8, False), "paged_adamw": (32, True), "paged_adamw_8bit": (8, True)}


def make(name: str, params, lr: float, weight_decay: float = 0.0, budget_bytes: int = 0, **kw) -> AdamW:
    if name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(NAMES)}")
    bits, paged = NAMES[name]
    return AdamW(params, lr=lr, weight_decay=weight_decay, bits=bits, paged=paged, budget_bytes=budget_bytes, **kw)
