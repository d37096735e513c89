"""Activation-aware per-input-channel scaling (AWQ-style; #14), searched on the bitsandbytes 4-bit grid.

Input channels that carry large activations matter more to a layer's output than their weights' size says.
Scaling those weight columns up before rounding gives them finer steps; dividing the layer's *input* by the
same factors (folded into the norm or linear layer before it — ``io/calibration.py``) keeps the model's
function, so the result is an ordinary model with ordinary 4-bit weights. For linear layers sharing one input,
with m_j = E|x_j| over the calibration tokens and H = E[xᵀx]::

    s(α)_j = m_j^α / sqrt(max_k m_k^α · min_k m_k^α)            α ∈ [0, 1] in steps of 1/n  (α = 0: s = 1, RTN)
    Ŵ(α)   = Q(W · diag(s)) · diag(s)⁻¹                          Q: round to nearest on the blockwise grid
    err(α) = Σ_layers tr((Ŵ − W) H (Ŵ − W)ᵀ)                     = E‖x Ŵᵀ − x Wᵀ‖², the output error

and the α with the least error wins (never worse than RTN on the calibration inputs, since α = 0 is a candidate).
The search is coarse to fine: every fourth step of the grid first, then the three steps either side of the best.
"""

from __future__ import annotations

import torch

from .spec import QuantSpec
from .tensor import quantize

__all__ = ["scales_for", "output_error", "search_scales"]


def scales_for(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = m^α, normalised so that max(s)·min(s) = 1 (float32; channels never seen get the smallest scale)."""
    m = mean_abs.double().clamp(min=1e-8)
    s = m.pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).float()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """E‖x (Ŵ − W)ᵀ‖² under inputs with second moment ``hessian`` (float32 products, float64 sum)."""
    d = w_hat.float() - w.float()
    return float(((d @ hessian.float()) * d).sum(dtype=torch.float64))


def _rounded(w: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return quantize(w * s, spec).dequantize(torch.float32) / s


def search_scales(weights: list[torch.Tensor], mean_abs: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec,
                  grid: int = 20, expand=None) -> tuple[torch.Tensor, float, float, float]:
    """The scales for ``weights`` (float32, each (out, in), sharing one input) with the least output error.

    ``expand``: maps the searched scales onto the input channels when several channels must share one scale
    (grouped-query attention); ``mean_abs`` is then given per shared scale. Returns
    ``(s, alpha, error_at_alpha, error_of_round_to_nearest)``, ``s`` before ``expand``.
    """
    hessian = hessian.float()
    tried: dict[int, tuple] = {}

    def trial(k: int) -> None:
        if 0 <= k <= grid and k not in tried:
            s = scales_for(mean_abs, k / grid)
            s_in = expand(s) if expand is not None else s
            tried[k] = (s, k / grid, sum(output_error(w, _rounded(w, s_in, spec), hessian) for w in weights))

    for k in sorted({*range(0, grid + 1, 4), grid}):
        trial(k)
    centre = min(tried.values(), key=lambda t: t[2])[1] * grid
    for k in range(round(centre) - 3, round(centre) + 4):
        trial(k)
    best = min(tried.values(), key=lambda t: t[2])
    return best[0], best[1], best[2], tried[0][2]
