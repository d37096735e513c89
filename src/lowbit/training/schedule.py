"""Learning-rate schedules by name (``SCHEDULERS``, the one table), as multipliers of the peak rate.

    warmup  step < w:  (step + 1) / (w + 1)
    then    f(frac),   frac = (step − w) / (total − w)
            cosine: ½(1 + cos(π·min(1, frac)))     linear: max(0, 1 − frac)     constant: 1

Importing this module does not import torch; ``lr_lambda`` is what ``torch.optim.lr_scheduler.LambdaLR`` takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import LowbitError

__all__ = ["SCHEDULERS", "lr_lambda"]

SCHEDULERS: dict[str, Callable[[float], float]] = {
    "cosine": lambda frac: 0.5 * (1 + math.cos(math.pi * min(1.0, frac))),
    "linear": lambda frac: max(0.0, 1 - frac),
    "constant": lambda frac: 1.0,
}


def lr_lambda(name: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """step → multiplier of the peak learning rate."""
    if name not in SCHEDULERS:
        raise LowbitError(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {name!r}")
    decay = SCHEDULERS[name]

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return decay((step - warmup_steps) / max(1, total_steps - warmup_steps))

    return f
