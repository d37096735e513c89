"""Token ids → batches: right padding masked by position, and a deterministic, resumable epoch order.

Padding is masked by position (attention_mask 0, label -100), never by token id, so an EOS that doubles as the
pad token is still learned. The order of epoch e is a function of (seed, e) alone, so a run's position is just
(epoch, batch index) — what a checkpoint stores for an exact resume.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from .formats import IGNORE

__all__ = ["collate", "sample_lengths", "Batches", "FixedBatches", "as_batches", "sample_batches"]


def sample_lengths(samples) -> list[int]:
    """Token count of each sample: a token table's own (``data/table.py``), else counted."""
    lengths = getattr(samples, "lengths", None)
    return lengths.tolist() if lengths is not None else [len(s[0]) for s in samples]


def collate(samples: list[tuple[list[int], list[int]]], pad_id: int, width: int | None = None,
            multiple_of: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample (or to ``width``; then up to a multiple of ``multiple_of``); padding is
    masked by position (attention_mask 0, label -100)."""
    n = max(width or 0, max(len(s[0]) for s in samples))
    if multiple_of > 1:
        n = -(-n // multiple_of) * multiple_of
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long, device="cpu")
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(samples), n), dtype=torch.long, device="cpu")
    for i, (x, y) in enumerate(samples):
        ids[i, : len(x)] = torch.tensor(x, device="cpu")
        labels[i, : len(y)] = torch.tensor(y, device="cpu")
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Batches:
    """Micro-batches of ``samples`` ((ids, labels) pairs): ``order(epoch)`` lists each batch's sample indices,
    ``batch(indices)`` collates them.

    ``group_by_length``: within each epoch, samples are shuffled, then sorted by length inside windows of
    ``micro_batch_size × 64`` so batches carry little padding (``data/packing.py`` packs samples into full rows
    instead). ``pad_to``: every batch padded to this width (Axolotl's ``pad_to_sequence_len``: fixed shapes, more
    pad); ``multiple_of``: widths rounded up to a multiple of it. ``shuffle=False``: samples in file order every
    epoch (Axolotl's ``curriculum_sampling``). ``samples``: a list of (ids, labels) or a ``data.table.TokenTable``.
    ``images``: a vision-language model's ``data.image_batches.ImageBatcher``, which adds each batch's images (the
    table's ``images`` column).
    """

    def __init__(self, samples, micro_batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = True,
                 pad_to: int | None = None, shuffle: bool = True, multiple_of: int = 0, images=None):
        self.samples, self.mb, self.pad_id = samples, micro_batch_size, pad_id
        self.seed, self.group, self.pad_to = seed, group_by_length, pad_to
        self.shuffle, self.multiple_of, self.images = shuffle, multiple_of, images
        self.lengths = sample_lengths(samples)

    def __len__(self) -> int:
        return -(-len(self.samples) // self.mb)

    def order(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            return self.sequential()
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.samples), generator=g, device="cpu").tolist()
        if self.group:
            w = self.mb * 64
            length = self.lengths.__getitem__
            perm = [i for k in range(0, len(perm), w) for i in sorted(perm[k : k + w], key=length)]
        batches = [perm[k : k + self.mb] for k in range(0, len(perm), self.mb)]
        bperm = torch.randperm(len(batches), generator=g, device="cpu").tolist()
        return [batches[i] for i in bperm]

    def sequential(self) -> list[list[int]]:
        """Every sample once, in file order (for evaluation)."""
        n = len(self.samples)
        return [list(range(i, min(i + self.mb, n))) for i in range(0, n, self.mb)]

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        out = collate([self.samples[i] for i in idx], self.pad_id, self.pad_to, self.multiple_of)
        if self.images is None:
            return out
        return self.images(out, [self.samples.row(i)["images"] for i in idx])


def sample_batches(samples, pad_id: int, count: int, seed: int = 1, size: int = 8) -> list[dict[str, torch.Tensor]]:
    """About ``count`` samples (at least one batch) in ``Batches``' seeded order for epoch 0, as ready batches of
    ``size`` — what a calibration pass reads."""
    b = Batches(samples, size, pad_id, seed)
    return [b.batch(idx) for idx in b.order(0)[: max(1, count // size)]]


class FixedBatches:
    """Ready-made batches (dicts with ``input_ids``, ``labels`` and optionally ``attention_mask``), taken in the
    same order every epoch — for a loop over batches built in Python."""

    def __init__(self, batches):
        self.batches = list(batches)
        if not self.batches:
            raise LowbitError("train_loop: no batches")

    def __len__(self) -> int:
        return len(self.batches)

    def order(self, epoch: int) -> list[int]:
        return list(range(len(self.batches)))

    def sequential(self) -> list[int]:
        return self.order(0)

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def as_batches(data):
    """``data`` if it is ``Batches``-like (``order``/``batch``), else ``FixedBatches(data)``."""
    return data if hasattr(data, "order") and hasattr(data, "batch") else FixedBatches(data)
