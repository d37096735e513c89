"""A preference run's loss module: the trained model's and the reference's log-probs → ``preference_loss``.

The reference costs no second model: it is the same 4-bit base with the LoRA layers switched off
(and trained embedding rows back to their originals: ``nn.lora.adapters_disabled``), run without gradients on the
same batch — or its log-probs computed once before training (``precompute_reference``; when, see ``reference.py``).

Batches (``data/preference_batches.py``): pairs hold the chosen rows then the rejected rows and ``units`` (the
pairs); KTO batches hold each example's row, ``desirable``, and a ``kl`` sub-batch of mismatched pairs. The module
returns ``(Σ losses, units)`` like ``loss.LossModule`` and keeps the step's metric sums in a ``metrics.MetricBook``.
"""

from __future__ import annotations

import torch

from ..data.formats import IGNORE
from ..nn.lora import adapters_disabled
from .loss import LossModule
from .metrics import MetricBook
from .preference_loss import kto_losses, pair_losses
from .preference_spec import PreferenceSpec
from .sequence_logps import sequence_logps

__all__ = ["PreferenceLoss", "precompute_reference"]


class PreferenceLoss(LossModule):
    def __init__(self, model, spec: PreferenceSpec):
        super().__init__(model)
        self.spec = spec
        self.book = MetricBook()

    def _reference(self, batch: dict) -> dict | None:
        """The reference's summed completion log-probs of every row, or None when the batch carries them."""
        if "ref" in batch or not self.spec.needs_reference:
            return None
        with torch.no_grad(), adapters_disabled(self.model):
            return sequence_logps(self.model, batch)

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        empty = not bool((batch["labels"] != IGNORE).any())  # an evaluation's padding pass: same work, no units
        loss, units, metrics = self._kto(batch) if "desirable" in batch else self._pairs(batch)
        if empty:
            return loss * 0.0, 0
        self.book.add("train" if self.training else "eval", metrics)
        return loss, units

    def _pairs(self, batch: dict):
        n = batch["input_ids"].shape[0] // 2
        lp = sequence_logps(self.model, batch, with_prompt=self.spec.method == "orpo")
        ref = self._reference(batch)
        ref = batch["ref"].to(lp["logp"].device) if ref is None and "ref" in batch else \
            (ref["logp"] if ref is not None else None)
        out = {"chosen": lp["logp"][:n], "rejected": lp["logp"][n:], "n_chosen": lp["n"][:n],
               "n_rejected": lp["n"][n:]}
        if self.spec.method == "orpo":
            out["nll"] = -lp["logp_all"][:n].sum() / lp["n_all"][:n].sum().clamp(min=1)
        elif self.spec.method == "simpo" and self.spec.cpo_alpha:
            out["nll"] = -lp["logp"][:n].sum() / lp["n"][:n].sum().clamp(min=1)
        refs = {"chosen": ref[:n], "rejected": ref[n:]} if ref is not None else None
        return pair_losses(self.spec, out, refs)

    def _kto(self, batch: dict):
        lp = sequence_logps(self.model, batch)["logp"]
        with torch.no_grad():
            kl_lp = sequence_logps(self.model, batch["kl"])["logp"]
            with adapters_disabled(self.model):
                ref = sequence_logps(self.model, batch)["logp"]
                kl_ref = sequence_logps(self.model, batch["kl"])["logp"]
        return kto_losses(self.spec, lp, ref, batch["desirable"].to(lp.device), kl_lp, kl_ref)

    def take_metrics(self, split: str, world) -> dict[str, float]:
        """The means of the metrics since the last call (over every rank), and a fresh start."""
        return self.book.take(split, world)


@torch.no_grad()
def precompute_reference(model, batches, dtype, device, log=print) -> torch.Tensor:
    """The summed completion log-probs of every sample's chosen and rejected rows under ``model`` as it is now
    (``[samples, 2]``, float32, on the host), for ``batches.with_reference``."""
    from .loss import autocast

    order = batches.sequential()
    out = torch.zeros(len(batches.samples), 2, dtype=torch.float32, device="cpu")
    was = model.training
    model.eval()
    try:
        for idx in order:
            b = batches.batch(idx)
            with autocast(dtype, device.type):
                lp = sequence_logps(model, b)["logp"].float().cpu()
            out[idx, 0], out[idx, 1] = lp[: len(idx)], lp[len(idx):]
    finally:
        model.train(was)
    log(f"reference log-probs computed for {len(out)} pairs")
    return out
