"""Stopping a run early: when the held-out loss stops improving, and when the training loss has blown up.

    EarlyStopping   early_stopping_patience = n: stop after n evaluations in a row without a new best eval loss
                    (transformers' EarlyStoppingCallback); the run ends normally and saves its adapter
    LossWatchdog    loss_watchdog_threshold = t, loss_watchdog_patience = n: the loss above t for n steps in a row
                    (Axolotl's watchdog) stops the run as failed; the last checkpoint written before stays

Both set ``state.stop_reason``; the loop ends the step it is in and stops.
"""

from __future__ import annotations

import math

from .callbacks import Callback

__all__ = ["EarlyStopping", "LossWatchdog"]


class EarlyStopping(Callback):
    def __init__(self, patience: int, log=print):
        self.patience, self.log = patience, log
        self.best, self.bad = math.inf, 0

    def on_step_end(self, state, record):
        loss = record.get("eval_loss")
        if loss is None:
            return
        if loss < self.best:
            self.best, self.bad = loss, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            state.stop_reason = (f"early stopping: eval loss {loss:.4f} has not improved on {self.best:.4f} for "
                                 f"{self.bad} evaluations (early_stopping_patience)")


class LossWatchdog(Callback):
    failed = True  # the run stops as failed

    def __init__(self, threshold: float, patience: int):
        self.threshold, self.patience, self.high = threshold, patience, 0

    def on_step_end(self, state, record):
        self.high = self.high + 1 if record["loss"] > self.threshold else 0
        if self.high >= self.patience:
            state.stop_reason = (f"loss watchdog: the loss stayed above {self.threshold} for {self.high} steps "
                                 f"(now {record['loss']:.4f} at step {state.step})")
            state.stop_failed = True
