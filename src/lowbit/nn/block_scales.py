"""Trainable block scales over frozen k-bit codes: a ``Linear4bit`` whose every block of ``blocksize`` weights is
multiplied by exp(t), t one float per block (zero: the stored weight exactly). What the end-to-end calibration pass
trains (``io/e2e.py``).

    Ŵ      = deq(Q) ⊙ m,   m = exp(t) repeated over each block
    y      = x Ŵᵀ + b
    ∂L/∂x  = ∂L/∂y · Ŵ
    ∂L/∂t  = m ⊙ Σ_block (∂L/∂yᵀ x) ⊙ deq(Q)       (the weight gradient, one out × in product, summed per block)

Nothing dense is kept between forward and backward (the weight is dequantized again, as ``Linear4bit`` does).
``fold_block_scales`` stores s·exp(t) as the layer's scales (double-quantized like any other) over the same codes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.clipping import with_scales
from .linear import Linear4bit, _dequantized
from .row_chunks import base_matmul

__all__ = ["train_block_scales", "fold_block_scales", "scaled_matmul", "scale_blocks_", "block_count"]


def block_count(layer: Linear4bit) -> int:
    """The layer's blocks of ``blocksize`` weights (the last one may be partial): one scale each."""
    return -(-layer.in_features * layer.out_features // layer.weight.blocksize)


def scale_blocks_(w: torch.Tensor, m: torch.Tensor, blocksize: int) -> torch.Tensor:
    """w ⊙ m in place, m one multiplier per block (blocks: contiguous runs of the row-major weight)."""
    flat, n = w.view(-1), w.numel()
    if n % blocksize == 0:
        flat.view(-1, blocksize).mul_(m.to(w.dtype)[:, None])
    else:
        flat.mul_(m.to(w.dtype).repeat_interleave(blocksize)[:n])
    return w


def _scaled(q, m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """deq(Q) ⊙ m in the dequantization scratch."""
    return scale_blocks_(_dequantized(q, dtype), m, q.blocksize)


class _ScaledMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, t, bias, dtype):
        m = t.detach().float().exp()
        y = base_matmul(x.to(dtype), _scaled(q, m, dtype).t())
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(x, m)
        ctx.q, ctx.dtype = q, dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        x, m = ctx.saved_tensors
        q, dtype = ctx.q, ctx.dtype
        gx = gt = None
        w = _scaled(q, m, dtype)
        if ctx.needs_input_grad[0]:
            gx = base_matmul(gy.to(dtype), w).to(x.dtype)
        if ctx.needs_input_grad[2]:  # Σ_block gW ⊙ deq(Q)·m = m ⊙ Σ_block gW ⊙ deq(Q); sums in float32
            gw = gy.reshape(-1, gy.shape[-1]).to(dtype).t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            prod, bs = gw.mul_(w).view(-1), q.blocksize
            if prod.numel() % bs:
                prod = torch.nn.functional.pad(prod, (0, -prod.numel() % bs))
            gt = prod.view(-1, bs).sum(1, dtype=torch.float32)
        return gx, None, gt, None, None


def scaled_matmul(x: torch.Tensor, layer: Linear4bit, dtype: torch.dtype) -> torch.Tensor:
    return _ScaledMatmul.apply(x, layer.weight, layer.scale_log, layer.bias, dtype)


def train_block_scales(net: nn.Module) -> list[nn.Parameter]:
    """Give every ``Linear4bit`` of ``net`` a trainable per-block log-multiplier (zeros); returns them."""
    out = []
    for mod in net.modules():
        if isinstance(mod, Linear4bit):
            mod.scale_log = nn.Parameter(torch.zeros(block_count(mod), device=mod.codes.device))
            out.append(mod.scale_log)
    return out


@torch.no_grad()
def fold_block_scales(net: nn.Module) -> int:
    """Store each trained multiplier in its layer's scales (the codes stay) and drop the parameter; returns the
    number of layers changed (a layer whose multipliers are all 1 keeps its stored scales as they are)."""
    n = 0
    for mod in net.modules():
        if isinstance(mod, Linear4bit) and mod.scale_log is not None:
            t, mod.scale_log = mod.scale_log, None
            if t.any():
                old = mod.weight
                mod.weight = with_scales(old, old.absmax_float().float() * t.float().exp())
                n += 1
    return n
