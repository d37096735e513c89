"""Sample packing: several samples share one row of ``sequence_len`` tokens, each attending only to itself.

    row = [s₁ | s₂ | … | pad]     position_ids restart at 0 for every sample (and for the padding tail)
    label of each sample's first token = −100, so no sample predicts the next one's start

Given ``position_ids`` and no ``attention_mask``, transformers builds a block-diagonal causal mask from the
restarts (``masking_utils.find_packed_sequence_indices``): attention never crosses a sample boundary, rotary
positions are each sample's own, and a packed batch's summed loss is the unpacked samples' summed loss.

Rows are filled once, best-fit decreasing over the samples in a seeded order (tight rows: few pad tokens); each
epoch shuffles the rows, as ``Batches`` shuffles samples, so a run's position is still (epoch, batch index).
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from .batching import sample_lengths
from .formats import IGNORE

__all__ = ["pack_rows", "collate_packed", "PackedBatches"]


def pack_rows(lengths: list[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Sample indices grouped into rows of at most ``capacity`` tokens: longest first, each into the open row it
    fills best (ties in a seeded order)."""
    if lengths and max(lengths) > capacity:
        raise LowbitError(f"sample_packing: a sample of {max(lengths)} tokens does not fit sequence_len={capacity}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g, device="cpu").tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left → rows with that much room
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        r = next((c for c in range(n, capacity + 1) if by_room[c]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        else:
            row = by_room[r].pop()
        rows[row].append(i)
        room[row] -= n
        by_room[room[row]].append(row)
    return rows


def collate_packed(rows: list[list[tuple[list[int], list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of samples → ``input_ids``, ``labels``, ``position_ids`` (padded to the longest row) and ``tokens``
    (the real, non-pad token count)."""
    width = max(sum(len(s[0]) for s in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long, device="cpu")
    pos = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for x, y in row:
            n = len(x)
            ids[r, at : at + n] = torch.tensor(x, device="cpu")
            labels[r, at + 1 : at + n] = torch.tensor(y[1:], device="cpu")
            pos[r, at : at + n] = torch.arange(n, device="cpu")
            at += n
        pos[r, at:] = torch.arange(width - at, device="cpu")
        real += at
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "tokens": torch.tensor(real, device="cpu")}


class PackedBatches:
    """``Batches`` with packed rows: ``order(epoch)`` lists each micro-batch's row indices, ``batch(rows)``
    collates them (``shuffle=False``: rows in order every epoch). ``samples``: a list of (ids, labels) or a
    ``data.table.TokenTable``."""

    def __init__(self, samples, micro_batch_size: int, pad_id: int, sequence_len: int, seed: int = 0,
                 shuffle: bool = True):
        self.samples, self.mb, self.pad_id, self.seed, self.shuffle = samples, micro_batch_size, pad_id, seed, shuffle
        self.rows = pack_rows(sample_lengths(samples), sequence_len, seed)

    def __len__(self) -> int:
        return -(-len(self.rows) // self.mb)

    def order(self, epoch: int) -> list[list[int]]:
        if not self.shuffle:
            return self.sequential()
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1000003 + epoch)
        perm = torch.randperm(len(self.rows), generator=g, device="cpu").tolist()
        return [perm[k : k + self.mb] for k in range(0, len(perm), self.mb)]

    def sequential(self) -> list[list[int]]:
        n = len(self.rows)
        return [list(range(i, min(i + self.mb, n))) for i in range(0, n, self.mb)]

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return collate_packed([[self.samples[i] for i in self.rows[r]] for r in idx], self.pad_id)
