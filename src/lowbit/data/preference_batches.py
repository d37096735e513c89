"""Preference token tables → micro-batches (the order, grouping and resume of ``batching.Batches``).

    pairs   rows = [prompt_i + chosen_i for i] + [prompt_i + rejected_i for i]      units = pairs
    KTO     rows = [prompt_i + completion_i for i],  desirable_i,
            kl   = [prompt_i + completion_{i−1} for i]  (completions rotated by one: mismatched pairs)
                                                                                   units = examples

Each row is cut to ``max_length`` tokens from its start (TRL's ``keep_start``); prompt tokens are labelled −100, so
the learned tokens of a row are its completion. Paired data trains KTO as two examples per pair (chosen: desirable,
rejected: undesirable — TRL's ``unpair_preference_dataset``). ``reference``: precomputed reference log-probs
(``[samples, 2]``, chosen and rejected) carried in the batch as ``ref``. ``pad_to``: every row padded to this width
(``pad_to_sequence_len``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import LowbitError
from .batching import Batches, collate
from .formats import IGNORE

__all__ = ["PreferenceBatches"]


class _Examples:
    """KTO's examples of a table: ``(position, 0)`` its completion (or chosen), ``(position, 1)`` a pair's rejected."""

    def __init__(self, table):
        self.table, self.index, lengths = table, [], []
        for k in range(len(table)):
            r = table.row(k)
            p = len(r["prompt_ids"])
            self.index.append((k, 0))
            lengths.append(p + len(r["chosen_ids"]))
            if r["rejected_ids"]:
                self.index.append((k, 1))
                lengths.append(p + len(r["rejected_ids"]))
        self.lengths = np.asarray(lengths, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def example(self, i: int) -> tuple[list[int], list[int], bool]:
        k, which = self.index[i]
        r = self.table.row(k)
        return r["prompt_ids"], r["rejected_ids"] if which else r["chosen_ids"], bool(r["label"]) and not which


def _check_paired(table) -> None:
    """Pairs need a rejected completion in every row (KTO's unpaired examples have none)."""
    for part, rows in zip(getattr(table, "parts", []), getattr(table, "rows", [])):
        import pyarrow.compute as pc

        empty = pc.equal(pc.list_value_length(part.data.column("rejected_ids")), 0).to_numpy(zero_copy_only=False)
        if len(rows) and empty[rows].any():
            raise LowbitError("datasets: these are unpaired examples (prompt, completion, label): they train with "
                              "rl: kto; dpo, ipo, orpo and simpo need pairs (chosen and rejected)")


def _row(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    ids = (prompt + completion)[:max_length]
    return ids, ([IGNORE] * len(prompt) + completion)[:max_length]


class PreferenceBatches(Batches):
    def __init__(self, table, micro_batch_size: int, pad_id: int, max_length: int, seed: int = 0, kto: bool = False,
                 group_by_length: bool = True, shuffle: bool = True, multiple_of: int = 0,
                 reference: torch.Tensor | None = None, pad_to: int | None = None):
        self.kto, self.max_length, self.reference, self.width = kto, max_length, reference, pad_to
        self.table = table
        if not kto:
            _check_paired(table)
        super().__init__(_Examples(table) if kto else table, micro_batch_size, pad_id, seed, group_by_length,
                         shuffle=shuffle, multiple_of=multiple_of)

    def with_reference(self, reference: torch.Tensor) -> PreferenceBatches:
        """The same batches carrying precomputed reference log-probs."""
        if len(reference) != len(self.samples):
            raise LowbitError(f"reference log-probs for {len(reference)} pairs, but the data has {len(self.samples)}")
        self.reference = reference
        return self

    def batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self._kto(idx) if self.kto else self._pairs(idx)

    def _pairs(self, idx: list[int]) -> dict:
        rows = [self.table.row(k) for k in idx]
        chosen = [_row(r["prompt_ids"], r["chosen_ids"], self.max_length) for r in rows]
        rejected = [_row(r["prompt_ids"], r["rejected_ids"], self.max_length) for r in rows]
        out = {**collate(chosen + rejected, self.pad_id, self.width, self.multiple_of), "units": len(idx)}
        if self.reference is not None:
            ref = self.reference[idx]
            out["ref"] = torch.cat([ref[:, 0], ref[:, 1]])
        return out

    def _kto(self, idx: list[int]) -> dict:
        ex = [self.samples.example(i) for i in idx]
        rotated = [ex[i - 1][1] for i in range(len(ex))]  # completion i−1 (the last one for i = 0)
        out = collate([_row(p, c, self.max_length) for p, c, _ in ex], self.pad_id, self.width, self.multiple_of)
        out["kl"] = collate([_row(p, c, self.max_length) for (p, _, _), c in zip(ex, rotated)], self.pad_id,
                            self.width, self.multiple_of)
        out["desirable"] = torch.tensor([d for _, _, d in ex], dtype=torch.bool, device="cpu")
        out["units"] = len(idx)
        return out
