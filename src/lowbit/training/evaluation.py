"""Held-out loss: the mean next-token loss per learned token over a data set, without gradients."""

from __future__ import annotations

import torch

from ..data.batching import as_batches
from . import loss

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model, batches, dtype=None, max_batches: int | None = None) -> float:
    """Σ losses / Σ learned tokens over every batch once, in order (``batches``: ``data.Batches`` or a list of
    batch dicts)."""
    batches = as_batches(batches)
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    try:
        for k, key in enumerate(batches.sequential()):
            if max_batches is not None and k >= max_batches:
                break
            with loss.autocast(dtype):
                s, c = loss.lm_loss(model, batches.batch(key))
            tot, n = tot + float(s), n + c
    finally:
        model.train(was)
    return tot / max(n, 1)
