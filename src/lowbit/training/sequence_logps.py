"""Log-probability of each row's learned tokens, summed per row — what preference losses compare.

    logp[b] = Σ_{t: label_{b,t+1} ≠ −100} log p(label_{b,t+1} | tokens ≤ t),    n[b] = how many such t

``with_prompt`` also sums over every real (non-pad) next token of the row, prompt included (ORPO's NLL term).
For a model that is body → frozen head, the head runs in chunks over the counted positions only
(``nn.cross_entropy.chunked_token_logps``): the logits tensor never exists in full, as in ``loss.lm_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.formats import IGNORE
from ..generation import split_head
from ..nn.compiled_layers import is_compiled
from ..nn.cross_entropy import chunked_token_logps
from .loss import _inputs, _to

__all__ = ["sequence_logps", "token_logps"]


def token_logps(model, batch: dict, keep: torch.Tensor, targets: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """log p of ``targets`` at the positions ``keep`` marks (rows × (L−1)), flattened in row order; the logits
    divided by ``temperature`` first (GRPO scores what it sampled)."""
    body, head = split_head(model)
    inputs = _to(_inputs(batch, is_compiled(head)), keep.device)
    if body is None:
        logits = model(**inputs).logits[:, :-1][keep].float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    h = body(**inputs).last_hidden_state[:, :-1][keep]
    if temperature != 1.0:
        h = h / temperature
    if head.weight.requires_grad:
        logits = F.linear(h, head.weight.to(h.dtype)).float()
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
    return chunked_token_logps(h, head.weight, targets, compiled=is_compiled(head))


def sequence_logps(model, batch: dict, with_prompt: bool = False) -> dict[str, torch.Tensor]:
    """``{"logp", "n"}`` per row (float32, on the model's device); ``with_prompt`` adds ``"logp_all"``,
    ``"n_all"`` over every non-pad next token."""
    device = next(model.parameters()).device
    labels = batch["labels"][:, 1:]
    learned = labels != IGNORE
    mask = batch.get("attention_mask")
    real = mask[:, 1:].bool() if mask is not None else torch.ones_like(learned)
    keep = (real | learned) if with_prompt else learned
    rows = torch.arange(labels.shape[0], device="cpu")[:, None].expand_as(keep)[keep]
    targets = batch["input_ids"][:, 1:][keep]
    tok = token_logps(model, batch, keep.to(device), targets.to(device))
    counted = learned[keep].to(device)
    rows = rows.to(device)
    zeros = torch.zeros(labels.shape[0], dtype=torch.float32, device=device)
    out = {"logp": zeros.index_add(0, rows[counted], tok[counted]),
           "n": learned.sum(1).to(device=device, dtype=torch.float32)}
    if with_prompt:
        out["logp_all"] = zeros.index_add(0, rows, tok)
        out["n_all"] = keep.sum(1).to(device=device, dtype=torch.float32)
    return out
