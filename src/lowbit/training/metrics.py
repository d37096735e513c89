"""The metrics a loss module keeps between two log lines: sums and counts per name, per split, taken as means over
every rank (``callbacks.StepMetrics`` takes them each step; the preference and GRPO losses fill them)."""

from __future__ import annotations

from collections import defaultdict

__all__ = ["MetricBook"]


class MetricBook:
    def __init__(self):
        self.books = {"train": defaultdict(lambda: [0.0, 0]), "eval": defaultdict(lambda: [0.0, 0])}

    def add(self, split: str, metrics: dict) -> None:
        """``metrics``: name → (sum, count)."""
        book = self.books[split]
        for k, (s, c) in metrics.items():
            book[k][0] += s
            book[k][1] += c

    def take(self, split: str, world) -> dict[str, float]:
        """The means since the last call (over every rank: a collective), and a fresh start."""
        book = self.books[split]
        names = sorted(book)
        sums = world.sum(*[v for k in names for v in book[k]]) if names else []
        book.clear()
        prefix = "eval_" if split == "eval" else ""
        return {prefix + k: sums[2 * i] / sums[2 * i + 1] for i, k in enumerate(names) if sums[2 * i + 1]}
