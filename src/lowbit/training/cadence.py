"""How long a run is and how often it evaluates and saves, in optimizer steps.

    total   max_steps, else ⌈⌈batches per epoch / (accumulation × ranks)⌉ × num_epochs⌉
    every   eval_steps / save_steps: a number of steps; a fraction 0 < x < 1 of the total (Axolotl); 0: only at the
            end (evaluation also before training); evals_per_epoch / saves_per_epoch: that many times an epoch
"""

from __future__ import annotations

import dataclasses
import math

from .config import TrainConfig

__all__ = ["total_steps", "per_epoch_cadence", "steps_per_epoch"]


def steps_per_epoch(cfg: TrainConfig, batches_per_epoch: int, world_size: int = 1) -> int:
    return math.ceil(batches_per_epoch / (cfg.gradient_accumulation_steps * world_size))


def total_steps(cfg: TrainConfig, batches_per_epoch: int, world_size: int = 1) -> int:
    """``max_steps``, else enough optimizer steps for ``num_epochs`` passes (a step takes
    ``gradient_accumulation_steps`` micro-batches on each of ``world_size`` ranks)."""
    return cfg.max_steps or max(1, math.ceil(steps_per_epoch(cfg, batches_per_epoch, world_size) * cfg.num_epochs))


def per_epoch_cadence(cfg: TrainConfig, batches_per_epoch: int, world_size: int = 1, log=print) -> TrainConfig:
    """``cfg`` with ``eval_steps`` / ``save_steps`` as whole numbers of steps: from ``evals_per_epoch`` /
    ``saves_per_epoch`` (Axolotl's keys), from a fraction of the total, and 0 as "past the last step"."""
    per_epoch = steps_per_epoch(cfg, batches_per_epoch, world_size)
    total = total_steps(cfg, batches_per_epoch, world_size)
    changes, said = {}, []
    for key, per in (("eval_steps", "evals_per_epoch"), ("save_steps", "saves_per_epoch")):
        v = getattr(cfg, key)
        if getattr(cfg, per):
            changes[key] = max(1, per_epoch // getattr(cfg, per))
            said.append(f"{key} = {changes[key]}")
        elif isinstance(v, float) and 0 < v < 1:
            changes[key] = max(1, math.ceil(v * total))
            said.append(f"{key} = {changes[key]}")
        elif v == 0:
            changes[key] = total + 1  # never on the way; the last step still evaluates and saves
        elif isinstance(v, float):
            changes[key] = int(v)
    if said:
        log(", ".join(said) + f" (an epoch is {per_epoch} steps, the run {total})")
    return dataclasses.replace(cfg, **changes)
