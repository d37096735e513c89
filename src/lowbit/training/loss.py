"""The training loss of a batch: summed next-token cross-entropy over the learned (answer) tokens.

    loss(batch) = Σ_{t: label_{t+1} ≠ −100} CE(logits_t, label_{t+1}),   n = number of such t

Returned as ``(sum, n)`` so a group of micro-batches (or several processes) can normalise by the tokens of
the whole step. For a transformers model that is body → frozen head, the head and the loss run in chunks
(``nn/cross_entropy.py``) and the logits never exist in full; otherwise (a trainable head, logit
soft-capping, a wrapper such as peft's) the model's own forward gives the logits.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..data.formats import IGNORE
from ..dtypes import autocast
from ..generation import split_head
from ..nn.compiled_layers import is_compiled
from ..nn.cross_entropy import chunked_cross_entropy
from ..nn.document_attention import packed_rows

__all__ = ["lm_loss", "answer_tokens", "loss_units", "tokens_in", "autocast", "LossModule", "module_loss"]


def answer_tokens(batch) -> int:
    """How many next-token predictions of ``batch`` are learned."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def loss_units(batch) -> int:
    """What a batch's summed loss is divided by: its learned tokens, or a preference batch's pairs (examples)."""
    return int(batch["units"]) if "units" in batch else answer_tokens(batch)


def tokens_in(batch) -> int:
    """Non-pad tokens of ``batch``: a packed batch's own count, else by the attention mask (all without one)."""
    if "tokens" in batch:
        return int(batch["tokens"])
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _inputs(batch, compiled: bool = False) -> dict:
    """What the model is called with: a packed batch (``position_ids``, no mask) without a cache, so each document
    attends to itself alone (``nn/document_attention.py``; other attention implementations: transformers'
    block-diagonal mask from the position restarts). A right-padded batch goes without its padding mask:
    under causal attention a real token never sees the padding after it, so every learned position computes the same
    as with the mask, and attention needs no L×L mask tensor (PyTorch's flash kernel: O(L) memory). A
    vision-language batch adds its images (``data/image_batches.py``: the keys named in ``vision_keys``). With
    ``compiled`` layers no cache either (they take only forwards without one)."""
    if batch.get("position_ids") is not None:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    mask = batch.get("attention_mask")
    if mask is not None and _right_padded(mask):
        mask = None
    vision = {k: batch[k] for k in batch.get("vision_keys", ())}  # a vision-language model's images
    cache = {"use_cache": False} if compiled else {}
    return {"input_ids": batch["input_ids"], "attention_mask": mask, **vision, **cache}


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row is ones then zeros (its padding, if any, at the end)."""
    m = mask.to(torch.int8)
    return bool((m[:, 1:] <= m[:, :-1]).all())


def _to(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (batches are collated on the host; the copy overlaps from pinned memory)."""
    if all(not torch.is_tensor(v) or v.device == device for v in batch.values()):
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def lm_loss(model, batch, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses, number of learned tokens) — see the module docstring. The batch goes to the
    model's device."""
    n = answer_tokens(batch)  # counted on the host batch: no device sync
    device = next(model.parameters()).device
    body, head = split_head(model)
    inputs = _to(_inputs(batch, is_compiled(head)), device)
    labels = batch["labels"][:, 1:].reshape(-1).to(device, non_blocking=True)
    with packed_rows() if "position_ids" in inputs else contextlib.nullcontext():
        return _loss(model, body, head, inputs, labels, chunk_tokens), n


def _loss(model, body, head, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None) -> torch.Tensor:
    if body is None:
        out = model(**inputs)
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    h = body(**inputs).last_hidden_state
    h = h[:, :-1].reshape(-1, h.shape[-1])
    keep = labels != IGNORE
    h, labels = h[keep], labels[keep]
    if head.weight.requires_grad:  # a trainable head needs its weight gradient: the plain path
        logits = F.linear(h, head.weight.to(h.dtype)).float()
        return F.cross_entropy(logits, labels, reduction="sum")
    return chunked_cross_entropy(h, head.weight, labels, chunk_tokens, compiled=is_compiled(head))


class LossModule(nn.Module):
    """``lm_loss`` as a module: ``LossModule(model)(batch) -> (sum, tokens)``. DDP and FSDP only see what runs
    inside the module they wrap, and the chunked loss calls the model's body and head itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return lm_loss(self.model, batch)


def module_loss(module: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    """The loss function of a ``LossModule`` (or DDP/FSDP around one): call it."""
    return module(batch)
