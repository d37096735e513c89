"""Prompt tables → the prompts of each optimizer step (``rl: grpo``), in a resumable seeded order.

``order(epoch)`` lists each step's prompt indices (``per_step`` of them; the last step of an epoch is filled from
the epoch's start, so every step has whole groups); ``batch(indices)`` gives their token ids and columns. The
order of epoch e is a function of (seed, e), as in ``batching.Batches``. ``sequential()``: every prompt once, in
file order, ``per_step`` at a time (held-out prompts).
"""

from __future__ import annotations

import json

import torch

__all__ = ["PromptBatches"]


class PromptBatches:
    def __init__(self, table, per_step: int, seed: int = 0, shuffle: bool = True):
        self.samples, self.per_step, self.seed, self.shuffle = table, per_step, seed, shuffle

    def __len__(self) -> int:
        """Steps per epoch."""
        return -(-len(self.samples) // self.per_step)

    def order(self, epoch: int) -> list[list[int]]:
        n = len(self.samples)
        if self.shuffle:
            g = torch.Generator(device="cpu").manual_seed(self.seed * 1000003 + epoch)
            perm = torch.randperm(n, generator=g, device="cpu").tolist()
        else:
            perm = list(range(n))
        wrapped = perm + perm * (-(-self.per_step // n))  # the last step filled from the start
        return [wrapped[k : k + self.per_step] for k in range(0, len(self) * self.per_step, self.per_step)]

    def sequential(self) -> list[list[int]]:
        n = len(self.samples)
        return [list(range(k, min(k + self.per_step, n))) for k in range(0, n, self.per_step)]

    def batch(self, idx: list[int]) -> dict:
        rows = [self.samples.row(int(i)) for i in idx]
        return {"index": list(idx), "prompt_ids": [list(r["prompt_ids"]) for r in rows],
                "columns": [json.loads(r["columns"]) for r in rows]}
