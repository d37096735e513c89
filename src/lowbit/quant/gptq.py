"""Error-compensating rounding onto a fixed bitsandbytes 4-bit grid (GPTQ's column order; #14, first part).

The grid is round-to-nearest's: per block of ``blocksize`` weights the same absmax (double-quantized, as stored),
so the result is the same bitsandbytes layout with the same constants — only *which* of the 16 codes each weight
gets changes, and transformers + bitsandbytes load it as they load any NF4 checkpoint. With H the second moment
of the layer's calibration inputs (``second_moment``), the columns are rounded in order and each one's rounding
error is pushed onto the columns not yet rounded, where the inputs can absorb it:

    H ← H + λ·mean(diag H)·I ;   U = upper Cholesky factor of H⁻¹
    for column j:   q_j = s_j · code[nearest(w_j / s_j)]          (s_j: the column's block scales; a zero-point
                                                                   type rounds w_j / s_j + z_j and subtracts z_j)
                    e   = (w_j − q_j) / U_jj ;   W[:, k] −= e · U_jk  for k > j

(updates to later columns are batched ``block`` columns at a time, as GPTQ does). This minimises the layer's
output error ‖X(W − Ŵ)ᵀ‖ greedily, where round-to-nearest minimises ‖W − Ŵ‖.
"""

from __future__ import annotations

import torch

from .clipping import quantize_with_scales
from .codebooks import quant_order, zero_code
from .packing import pack_codes
from .spec import QUANT_TYPES, QuantSpec
from .tensor import QuantizedTensor, quantize
from .zero_point import block_shift, bounds

__all__ = ["second_moment", "gptq_quantize"]


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """H = XᵀX / n of calibration inputs ``x`` (…, in_features), in float64."""
    x = x.reshape(-1, x.shape[-1]).double()
    return x.T @ x / max(1, x.shape[0])


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = True, damp: float = 0.01, block: int = 128,
                  scales: torch.Tensor | None = None) -> QuantizedTensor:
    """``w`` (out, in) on round-to-nearest's grid with GPTQ's error compensation under ``hessian`` (in, in).
    ``scales``: per-block scales to use instead of the absmax (clipped ones: ``clipping.py``)."""
    spec = QuantSpec(quant_type, blocksize, double_quant)
    rtn = quantize(w, spec) if scales is None else quantize_with_scales(w, scales, spec)  # the grid
    out_f, in_f = w.shape
    per_weight = lambda t: t.float().repeat_interleave(blocksize)[: w.numel()].view(out_f, in_f)
    scale = per_weight(rtn.absmax_float())
    midpoints, order = quant_order(quant_type)
    code = rtn.code.float()
    shift = block_shift(rtn.zeros, code, rtn.absmax.numel())  # a zero-point type's shift (0 for the others)
    shift = torch.zeros_like(scale) if shift is None else per_weight(shift)
    lo, hi = bounds(quant_type)
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0  # inputs never seen: nothing to compensate with
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(in_f, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    wk = w.float().clone()
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=h.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1, err = wk[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, device=wk.device)
        for j in range(i2 - i1):
            s, z = scale[:, i1 + j], shift[:, i1 + j]
            c = order[torch.bucketize((w1[:, j] / s.clamp(min=1e-38) + z).clamp(lo, hi), midpoints)]
            codes[:, i1 + j] = c
            e = (w1[:, j] - (code[c.long()] - z) * s) / u[i1 + j, i1 + j]
            w1[:, j + 1:] -= e[:, None] * u[i1 + j, i1 + j + 1: i2][None, :]
            err[:, j] = e
        wk[:, i2:] -= err @ u[i1:i2, i2:]
    packed = pack_codes(codes, QUANT_TYPES[quant_type].storage_bits, pad=zero_code(quant_type)).view(-1, 1)
    return QuantizedTensor(packed, rtn.absmax, rtn.shape, rtn.dtype, blocksize, quant_type, rtn.code,
                           rtn.nested_absmax, rtn.nested_code, rtn.nested_offset, zeros=rtn.zeros)
