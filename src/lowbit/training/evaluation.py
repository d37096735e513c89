"""Held-out loss: the mean next-token loss per learned token over a data set, without gradients (a GRPO run's:
minus the mean reward of completions to held-out prompts, ``grpo.py``).

With several ranks each evaluates every N-th batch and the sums are added; every rank runs the same number of
forward passes (a rank short of batches runs a fully masked one), as DDP and FSDP need.
"""

from __future__ import annotations

import torch

from ..data.batching import as_batches
from ..data.formats import IGNORE
from . import loss
from .distributed import World

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, batches, dtype=None, max_batches: int | None = None, loss_fn=None,
             world: World | None = None, device=None) -> float:
    """Σ losses / Σ learned tokens over every batch once, in order (``batches``: ``data.Batches`` or a list of
    batch dicts; ``loss_fn(model, batch) -> (sum, tokens)``, default ``lm_loss``)."""
    batches, world, loss_fn = as_batches(batches), world or World(), loss_fn or loss.lm_loss
    keys = batches.sequential()[:max_batches]
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    try:
        for i in range(world.rank, -(-len(keys) // world.size) * world.size, world.size):
            b = batches.batch(keys[min(i, len(keys) - 1)])
            if i >= len(keys):  # a padding pass: same shapes, nothing counted
                b = {**b, "labels": torch.full_like(b["labels"], IGNORE)} if "labels" in b else {**b, "pad": True}
            with loss.autocast(dtype, getattr(device, "type", "cpu")):
                s, c = loss_fn(model, b)
            tot, n = tot + float(s), n + c
    finally:
        model.train(was)
    tot, n = world.sum(tot, n)
    return tot / max(n, 1)
