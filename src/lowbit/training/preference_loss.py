"""Preference losses on sequence log-probabilities — TRL 1.16's formulas (its trainers are the tests' oracle).

Per pair, with π = log p(completion | prompt) summed over the completion tokens under the trained model, ρ the same
under the reference, n the completion's token count, β the temperature, ε the label smoothing:

    Δ        = (π_c − ρ_c) − (π_r − ρ_r)
    sigmoid  = −log σ(βΔ)                                              (DPO)
    hinge    = max(0, 1 − βΔ)                                          (SLiC)
    ipo      = ((π_c − ρ_c)/n_c − (π_r − ρ_r)/n_r − 1/(2β))²            (IPO, length-normalised as TRL does)
    robust   = ((1−ε)·(−log σ(βΔ)) + ε·log σ(βΔ·−1)) / (1 − 2ε)        (rDPO)
    dpo      = Σ_types w_type · type                                   (dpo_loss_type, dpo_loss_weights)

    simpo    = −(1−ε)·log σ(β·(π̄_c − π̄_r) − γ) − ε·log σ(−β·(π̄_c − π̄_r) + γ) + α_cpo·NLL_c
               π̄ = π / n (the mean log-prob), no reference, NLL_c the mean token NLL of the chosen completions
    orpo     = NLL_c⁺ − α·log σ(log odds),  log odds = (π̄_c − π̄_r) − (log(1 − e^π̄_c) − log(1 − e^π̄_r))
               NLL_c⁺ over the chosen rows' prompt and completion tokens (TRL's ORPO does so)
    kto      = w_d·(1 − σ(β(π − ρ − z))) for a desirable completion, w_u·(1 − σ(β(z − (π − ρ)))) for an undesirable
               one; z = max(0, mean(π_KL − ρ_KL)) over the batch's mismatched pairs (prompt i with completion i−1),
               detached

A batch's loss is the mean of these over its pairs (KTO: its examples); ``pair_losses`` returns the sum and the
count so gradient accumulation and several ranks normalise over a whole step. The NLL terms are batch means (as
TRL computes them per batch) counted once per pair. Rewards: β·(π − ρ) (SimPO: β·π̄, ORPO: α·π̄); the metrics
come back as (sum, count) so they too can be averaged over a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .preference_spec import PreferenceSpec

__all__ = ["pair_losses", "kto_losses", "log1mexp"]


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation on either side of −log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _dpo(spec: PreferenceSpec, pc, pr, rc, rr, nc, nr) -> torch.Tensor:
    delta = (pc - rc) - (pr - rr)
    total = torch.zeros_like(delta)
    for kind, w in zip(spec.loss_types, spec.loss_weights):
        if kind == "sigmoid":
            loss = -F.logsigmoid(spec.beta * delta)
        elif kind == "hinge":
            loss = torch.relu(1 - spec.beta * delta)
        elif kind == "ipo":
            loss = ((pc - rc) / nc.clamp(min=1) - (pr - rr) / nr.clamp(min=1) - 1 / (2 * spec.beta)) ** 2
        elif kind == "robust":
            eps = spec.label_smoothing
            loss = (-(1 - eps) * F.logsigmoid(spec.beta * delta) + eps * F.logsigmoid(-spec.beta * delta)) \
                / (1 - 2 * eps)
        else:
            raise ValueError(kind)
        total = total + w * loss
    return total


def pair_losses(spec: PreferenceSpec, lp: dict, ref: dict | None) -> tuple[torch.Tensor, int, dict]:
    """(Σ per-pair loss, pairs, metric sums) of a batch of pairs. ``lp``: the trained model's ``chosen`` /
    ``rejected`` summed completion log-probs, their token counts ``n_chosen`` / ``n_rejected``, and (ORPO, SimPO
    with α_cpo > 0) ``nll`` — the batch's mean NLL over the tokens the method learns. ``ref``: the reference's
    ``chosen`` / ``rejected`` (DPO)."""
    pc, pr, nc, nr = lp["chosen"], lp["rejected"], lp["n_chosen"], lp["n_rejected"]
    pairs = pc.shape[0]
    if spec.method in ("dpo", "ipo"):
        rc, rr = ref["chosen"], ref["rejected"]
        losses = _dpo(spec, pc, pr, rc, rr, nc, nr)
        reward_c, reward_r = spec.beta * (pc - rc).detach(), spec.beta * (pr - rr).detach()
    elif spec.method == "simpo":
        ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
        logits = (ac - ar) - spec.simpo_gamma / spec.beta
        eps = spec.label_smoothing
        losses = -F.logsigmoid(spec.beta * logits) * (1 - eps) - F.logsigmoid(-spec.beta * logits) * eps
        if spec.cpo_alpha:
            losses = losses + spec.cpo_alpha * lp["nll"]
        reward_c, reward_r = spec.beta * ac.detach(), spec.beta * ar.detach()
    elif spec.method == "orpo":
        ac, ar = pc.float() / nc.clamp(min=1), pr.float() / nr.clamp(min=1)
        log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
        losses = lp["nll"] - spec.orpo_alpha * F.logsigmoid(log_odds)
        reward_c, reward_r = spec.orpo_alpha * ac.detach(), spec.orpo_alpha * ar.detach()
    else:
        raise ValueError(spec.method)
    margin = reward_c - reward_r
    metrics = {"rewards/chosen": (float(reward_c.sum()), pairs), "rewards/rejected": (float(reward_r.sum()), pairs),
               "rewards/margins": (float(margin.sum()), pairs),
               "rewards/accuracies": (float((margin > 0).float().sum()), pairs)}
    return losses.sum(), pairs, metrics


def kto_losses(spec: PreferenceSpec, lp: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor,
               kl_lp: torch.Tensor, kl_ref: torch.Tensor) -> tuple[torch.Tensor, int, dict]:
    """(Σ weighted losses, examples, metric sums) of a KTO batch: ``lp`` / ``ref`` the summed completion
    log-probs of each example, ``desirable`` its label, ``kl_lp`` / ``kl_ref`` those of the mismatched pairs."""
    z = (kl_lp - kl_ref).mean().detach().clamp(min=0)
    ratio = lp - ref
    d = desirable.bool()
    losses = torch.where(d, spec.desirable_weight * (1 - torch.sigmoid(spec.beta * (ratio - z))),
                         spec.undesirable_weight * (1 - torch.sigmoid(spec.beta * (z - ratio))))
    rewards = spec.beta * ratio.detach()
    metrics = {"rewards/chosen": (float(rewards[d].sum()), int(d.sum())),
               "rewards/rejected": (float(rewards[~d].sum()), int((~d).sum())), "kl": (float(z), 1)}
    return losses.sum(), lp.shape[0], metrics
