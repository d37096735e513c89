"""The training loop, handed its parts: a model with trainable (LoRA) parameters, an optimizer, batches.

    for step in state.step+1 .. steps:
        (online training: ``rollout(the step's prompts, step)`` first makes this rank's micro-batches)
        for each of `accumulation` micro-batches:
            loss = Σ token losses / learned tokens in the whole step      (autocast in 16-bit dtypes;
                   a preference step: Σ pair losses / pairs, ``loss.loss_units``)
            loss.backward()
        clip gradients; optimizer.step(); scheduler.step()
        callbacks see the step's record (evaluation, metrics, progress, checkpoints); one may stop the run
        (``state.stop_reason``: early stopping, the loss watchdog)

With several ranks (``world``, see ``distributed.py``) a step takes N·g micro-batches of the one order, rank r
the r-th of every N; the learned tokens are counted over all ranks, and each rank's loss is scaled by N because
DDP/FSDP average gradients — so the step equals one process's step over the same N·g micro-batches.

A non-finite loss stops the run (``NonFiniteLoss``) before the optimizer applies it. Ctrl-C drops the
half-accumulated step and rolls the state back to that step's start before ``KeyboardInterrupt`` propagates,
so a checkpoint written then resumes exactly. ``batches`` is a ``data.Batches`` or any list of batch dicts.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..data.batching import as_batches
from ..errors import LowbitError
from . import loss as losses
from .distributed import World
from .state import TrainState

__all__ = ["train_loop", "NonFiniteLoss", "learned_tokens"]


class NonFiniteLoss(LowbitError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"step {step}: loss is {loss}")


def train_loop(model, optimizer, batches, *, steps: int, scheduler=None, state: TrainState | None = None,
               accumulation: int = 1, max_grad_norm: float = 1.0, dtype=None, loss_fn=None, callbacks=(),
               world: World | None = None, device=None, rollout=None) -> TrainState:
    """Train until ``state.step == steps``; returns the state. ``loss_fn(model, batch) -> (sum, tokens)``
    defaults to ``training.loss.lm_loss``. ``rollout(batch, step) -> [micro-batch, …]``: each step takes one
    batch of ``batches`` (its prompts) and trains on the micro-batches the rollout makes of it (``grpo.py``)."""
    data, state, world = as_batches(batches), state or TrainState(), world or World()
    loss_fn = loss_fn or losses.lm_loss
    params = [p for p in model.parameters() if p.requires_grad]
    for cb in callbacks:
        cb.on_train_begin(state)
    model.train()
    state.mark()
    state.restart_clock()
    try:
        while state.step < steps and state.stop_reason is None:
            group = _next_group(data, state, accumulation, world, rollout, dtype, device)
            loss, tokens = _forward_backward(model, group, loss_fn, dtype, world, device)
            if not math.isfinite(loss):
                raise NonFiniteLoss(state.step + 1, loss)
            gnorm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm) if max_grad_norm > 0 else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            record = state.finish_step(data, loss, lr, gnorm, tokens)
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


def _next_group(data, state: TrainState, accumulation: int, world: World, rollout, dtype, device) -> list[dict]:
    """This rank's micro-batches of the next step."""
    if rollout is not None:
        (key,) = state.next_keys(data, 1)
        with losses.autocast(dtype, getattr(device, "type", "cpu")):
            return rollout(data.batch(key), state.step + 1)
    keys = state.next_keys(data, accumulation * world.size)  # the same keys on every rank
    return [data.batch(k) for k in keys[world.rank :: world.size]]


def learned_tokens(group: list[dict], world: World) -> float:
    """The step's learned tokens (a preference step's pairs), counted over every rank: what each micro-batch's
    summed loss is divided by."""
    return world.sum(sum(losses.loss_units(b) for b in group))[0]


def _sync(model, last: bool):
    """Reduce gradients only with the last micro-batch of a step (DDP ``no_sync``, FSDP2 gradient sync)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(last)
    elif hasattr(model, "no_sync") and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _forward_backward(model, group: list[dict], loss_fn, dtype, world: World, device=None) -> tuple[float, int]:
    """Gradients of one optimizer step; returns (loss per learned token, tokens seen), both over all ranks."""
    n_tok = max(1.0, learned_tokens(group, world))
    total = 0.0
    for i, b in enumerate(group):
        with _sync(model, i == len(group) - 1):
            with losses.autocast(dtype, getattr(device, "type", "cpu")):
                s, _ = loss_fn(model, b)
            (s * (world.size / n_tok)).backward()
        total += s.detach().item()
    total, tokens = world.sum(total, sum(losses.tokens_in(b) for b in group))
    return total / n_tok, int(tokens)
