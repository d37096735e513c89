"""GRPO's advantages and per-token loss, as TRL 1.16's ``GRPOTrainer`` computes them (``sum_then_normalize``,
token-level importance sampling).

    r_i        = Σ_f w_f · reward_f(i)      (None from a function is skipped; None from all: r_i = NaN, A_i = 0)
    A_i        = (r_i − mean_group(r)) / (std + 1e-4)     std: of the group, of the whole step (batch), or none
    ρ_t        = exp(log π(y_t) − log π_old(y_t))          π_old: the log-probs at sampling time (= π, detached)
    ℓ_t        = −min(ρ_t A, clip(ρ_t, 1 − ε, 1 + ε_high) A) + β · ρ_t · (exp(q_t) − q_t − 1),  q = log π_ref − log π
    grpo       Σ_i (Σ_t ℓ_t / T_i) / rows         bnpo     Σ ℓ / Σ T     per micro-batch
    dr_grpo    Σ ℓ / (rows · max_completion_length) per micro-batch         dapo     Σ ℓ / Σ T over the whole step

(std: the unbiased one, NaNs ignored.) Each aggregation is returned as ``(sum, units)`` so the loop divides the
step's sums by its units: rows (grpo), 1 per micro-batch (bnpo, dr_grpo: TRL's mean over accumulated micro-batches)
or completion tokens (dapo).
"""

from __future__ import annotations

import torch

from .grpo_spec import GRPOSpec

__all__ = ["advantages", "weighted_rewards", "policy_loss", "nanstd"]


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation, NaNs left out (TRL's ``nanstd``)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim)
    var = torch.nanmean((x - mean) ** 2, dim=dim) * n / (n - 1)
    return var.sqrt()


def weighted_rewards(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """r_i per completion from ``rewards`` ``[completions, functions]`` (NaN: a function returned None); NaN where
    every function returned None."""
    r = (rewards * weights[None]).nansum(1)
    r[torch.isnan(rewards).all(1)] = torch.nan
    return r


def advantages(rewards: torch.Tensor, weights: torch.Tensor, group: int, scale: str,
               batch_std=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage per completion, weighted reward per completion) from ``rewards`` ``[completions, functions]``
    (NaN: a function returned None) in groups of ``group`` consecutive rows. ``batch_std(r)`` gives the step's
    standard deviation over every rank for ``scale == "batch"`` (default: over ``rewards``)."""
    r = weighted_rewards(rewards, weights)
    grouped = r.view(-1, group)
    mean = torch.nanmean(grouped, 1).repeat_interleave(group)
    if scale == "batch":
        std = (batch_std(r) if batch_std else nanstd(r)).expand_as(r)
    else:
        std = nanstd(grouped, 1).repeat_interleave(group)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), r


def policy_loss(spec: GRPOSpec, logp: torch.Tensor, old: torch.Tensor | None, ref: torch.Tensor | None,
                adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float, dict]:
    """(summed loss, units, metric sums) of one micro-batch; ``logp``, ``old``, ``ref``, ``mask``:
    ``[rows, completion tokens]`` (``old`` None: sampled by this very model, ``logp`` detached)."""
    mask = mask.to(logp.dtype)
    old = logp.detach() if old is None else old
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1 - spec.epsilon, 1 + spec.epsilon_high)
    a = adv[:, None]
    loss = -torch.min(ratio * a, clipped * a)
    kl = None
    if spec.beta != 0.0:
        q = ref - logp
        kl = torch.exp(q) - q - 1
        loss = loss + spec.beta * kl * ratio
    lengths = mask.sum(1)
    rows = logp.shape[0]
    if spec.loss_type == "grpo":
        out, units = ((loss * mask).sum(1) / lengths.clamp(min=1.0)).sum(), float(rows)
    elif spec.loss_type == "bnpo":
        out, units = (loss * mask).sum() / lengths.sum().clamp(min=1.0), 1.0
    elif spec.loss_type == "dr_grpo":
        out, units = (loss * mask).sum() / (rows * spec.max_completion_length), 1.0
    else:  # dapo
        out, units = (loss * mask).sum(), float(lengths.sum())
    return out, units, _metrics(spec, ratio.detach(), a, kl, mask)


def _metrics(spec: GRPOSpec, ratio, a, kl, mask) -> dict:
    """Sums and counts (over completion tokens) of the clip ratios TRL logs, and the mean KL."""
    n = float(mask.sum())
    low = ((ratio < 1 - spec.epsilon) & (a < 0)).to(mask.dtype)
    high = ((ratio > 1 + spec.epsilon_high) & (a > 0)).to(mask.dtype)
    out = {"clip_ratio/low_mean": (float((low * mask).sum()), n),
           "clip_ratio/high_mean": (float((high * mask).sum()), n),
           "clip_ratio/region_mean": (float(((low + high) * mask).sum()), n)}
    if kl is not None:
        out["kl"] = (float((kl.detach() * mask).sum()), n)
    return out
