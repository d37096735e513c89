"""``TrainState``: where a run is, and what a Ctrl-C rolls back to.

    step      optimizer steps taken
    epoch     current pass over the data;  pos: next micro-batch of that epoch's order
    history   {"base_eval_loss": …, "eval": [[step, loss], …]}
    mark      (epoch, pos, RNG state) at the start of the current step: an interrupted step is undone by
              returning to it, so a checkpoint written after Ctrl-C resumes exactly

The position is all a checkpoint needs about the data, because an epoch's order is a function of
(seed, epoch) alone (``data.batching``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

__all__ = ["TrainState"]


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    pos: int = 0
    history: dict = field(default_factory=lambda: {"eval": []})
    tokens_seen: int = 0                                     # non-pad tokens since the loop (re)started
    started: float = field(default_factory=time.perf_counter)  # when it (re)started: tokens/s counts from here
    stop_reason: str | None = None                           # a callback asks the loop to stop (not saved)
    stop_failed: bool = False                                # … because the run went wrong
    _mark: tuple | None = field(default=None, repr=False)
    _order: tuple[int, list] | None = field(default=None, repr=False)   # (epoch, that epoch's order)

    def order(self, data) -> list:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, data.order(self.epoch))
        return self._order[1]

    def next_keys(self, data, k: int) -> list:
        """The keys of the next ``k`` micro-batches (``data.batch(key)`` makes one), moving to the next epoch
        where one ends."""
        keys = []
        for _ in range(k):
            if self.pos >= len(self.order(data)):
                self.epoch, self.pos = self.epoch + 1, 0
            keys.append(self.order(data)[self.pos])
            self.pos += 1
        return keys

    def restart_clock(self) -> None:
        """Throughput counts from now (a resumed run's tokens/s is this process's)."""
        self.started, self.tokens_seen = time.perf_counter(), 0

    def mark(self) -> None:
        self._mark = (self.epoch, self.pos, torch.get_rng_state())

    def rollback(self) -> None:
        """Back to the start of the step in progress (data position and RNG)."""
        if self._mark is not None:
            self.epoch, self.pos, rng = self._mark
            torch.set_rng_state(rng)

    def finish_step(self, data, loss: float, lr: float, grad_norm, tokens: int) -> dict:
        """Count the step (``tokens``: non-pad tokens it trained on), move the rollback mark here, and return its
        metrics record."""
        self.step += 1
        self.mark()
        self.tokens_seen += tokens
        return {"step": self.step, "epoch": self.epoch + self.pos / len(self.order(data)), "loss": loss, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": self.tokens_per_s(), "time_s": time.perf_counter() - self.started}

    def tokens_per_s(self) -> float:
        return self.tokens_seen / max(1e-9, time.perf_counter() - self.started)

    def to_json(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "pos": self.pos, "history": self.history}

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        return cls(step=d["step"], epoch=d["epoch"], pos=d["pos"], history=d["history"])
