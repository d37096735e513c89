"""The training loop, handed its parts: a model with trainable (LoRA) parameters, an optimizer, batches.

    for step in state.step+1 .. steps:
        for each of `accumulation` micro-batches:
            loss = Σ token losses / learned tokens in the whole group        (autocast in 16-bit dtypes)
            loss.backward()
        clip gradients; optimizer.step(); scheduler.step()
        callbacks see the step's record (evaluation, metrics, progress, checkpoints)

A non-finite loss stops the run (``NonFiniteLoss``) before the optimizer applies it. Ctrl-C drops the
half-accumulated step and rolls the state back to that step's start before ``KeyboardInterrupt`` propagates,
so a checkpoint written then resumes exactly. ``batches`` is a ``data.Batches`` or any list of batch dicts.
"""

from __future__ import annotations

import math

import torch

from ..data.batching import as_batches
from ..errors import LowbitError
from . import loss as losses
from .state import TrainState

__all__ = ["train_loop", "NonFiniteLoss"]


class NonFiniteLoss(LowbitError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"step {step}: loss is {loss}")


def train_loop(model, optimizer, batches, *, steps: int, scheduler=None, state: TrainState | None = None,
               accumulation: int = 1, max_grad_norm: float = 1.0, dtype=None, loss_fn=None,
               callbacks=()) -> TrainState:
    """Train until ``state.step == steps``; returns the state. ``loss_fn(model, batch) -> (sum, tokens)``
    defaults to ``training.loss.lm_loss``."""
    data, state = as_batches(batches), state or TrainState()
    loss_fn = loss_fn or losses.lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    for cb in callbacks:
        cb.on_train_begin(state)
    model.train()
    state.mark()
    state.restart_clock()
    try:
        while state.step < steps:
            group = state.next_group(data, accumulation)
            loss = _forward_backward(model, group, loss_fn, dtype)
            if not math.isfinite(loss):
                raise NonFiniteLoss(state.step + 1, loss)
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            record = state.finish_step(data, loss, lr, gnorm, group)
            for cb in callbacks:
                cb.on_step_end(state, record)
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)  # drop the half-accumulated step
        state.rollback()
        raise
    finally:
        for cb in callbacks:
            cb.on_train_end(state)
    return state


def _forward_backward(model, group: list[dict], loss_fn, dtype) -> float:
    """Gradients of one optimizer step; the loss of each micro-batch is divided by the group's learned tokens."""
    n_tok = max(1, sum(losses.answer_tokens(b) for b in group))
    total = 0.0
    for b in group:
        with losses.autocast(dtype):
            s, _ = loss_fn(model, b)
        (s / n_tok).backward()
        total += s.detach().item()
    return total / n_tok
