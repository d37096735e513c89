"""Learning-rate schedules by name (``SCHEDULERS``, the one table), as multipliers of the peak rate.

    warmup  step < w:  (step + 1) / (w + 1)                  (squared with lr_quadratic_warmup)
    then    f(frac),   frac = (step − w) / (total − w)
            cosine:    m + (1 − m)·½(1 + cos(π·min(1, frac)))     m = cosine_min_lr_ratio
                       with cosine_constant_lr_ratio c > 0, frac = (min(step, ⌊c·total⌋) − w) / (⌊c·total⌋ − w):
                       the minimum is held from step ⌊c·total⌋ on (Axolotl's warmup-decay-constant schedule)
            linear:    max(0, 1 − frac)
            constant_with_warmup: 1
    constant           1 from the first step: no warmup (as transformers' "constant")

Importing this module does not import torch; ``lr_lambda`` is what ``torch.optim.lr_scheduler.LambdaLR`` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import LowbitError

__all__ = ["SCHEDULERS", "lr_lambda", "warmup_steps"]

SCHEDULERS: dict[str, Callable[[float, float], float]] = {
    "cosine": lambda frac, m: m + (1 - m) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))),
    "linear": lambda frac, m: max(0.0, 1 - frac),
    "constant": lambda frac, m: 1.0,
    "constant_with_warmup": lambda frac, m: 1.0,
}


def warmup_steps(steps: int, ratio: float, total: int) -> int:
    """The warmup length: ``⌊ratio × total⌋`` when a ratio is given (as Axolotl), else ``steps``."""
    return int(ratio * total) if ratio > 0 else steps


def lr_lambda(name: str, warmup: int, total_steps: int, min_ratio: float = 0.0, constant_ratio: float = 0.0,
              quadratic: bool = False) -> Callable[[int], float]:
    """step → multiplier of the peak learning rate."""
    if name not in SCHEDULERS:
        raise LowbitError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    decay = SCHEDULERS[name]
    if name == "constant":
        warmup = 0
    end = int(total_steps * constant_ratio) if constant_ratio > 0 else total_steps

    def f(step: int) -> float:
        if step < warmup:
            x = (step + 1) / (warmup + 1)
            return x * x if quadratic else x
        return decay((min(step, end) - warmup) / max(1, end - warmup), min_ratio)

    return f
