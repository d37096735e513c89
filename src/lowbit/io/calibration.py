"""Calibrated 4-bit weights for a loaded model (#14, first part): GPTQ-style rounding of every 4-bit linear
layer on round-to-nearest's grid (``quant/gptq.py``), so the model stays an ordinary bitsandbytes NF4 checkpoint.

    1. run the 4-bit model over calibration batches; at each ``Linear4bit`` accumulate H = Σ xᵀx / n of its
       inputs (the inputs as the quantized layers before it make them, as sequential GPTQ sees them)
    2. re-round each layer's full-precision weight (read again from the checkpoint, one layer at a time) with
       error compensation under its H

Memory: the model, one H per layer (in²·8 bytes: 2.6 MB for SmolLM2's 576-wide inputs) and one float32 weight.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.linear import Linear4bit
from ..quant.gptq import gptq_quantize
from .loader import SourceWeights

__all__ = ["input_second_moments", "calibrate_gptq"]


def input_second_moments(net: nn.Module, batches) -> dict[str, torch.Tensor]:
    """name → H (float64) of the inputs every ``Linear4bit`` of ``net`` sees over ``batches`` (dicts with
    ``input_ids`` and optionally ``attention_mask``; padded positions are left out)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[torch.Tensor | None] = [None]

    def hook(name):
        def add(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if keep[0] is not None:
                x = x[keep[0]]
            x = x.double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in net.named_modules() if isinstance(m, Linear4bit)]
    if not handles:
        raise LowbitError("calibration: the model has no 4-bit linear layers")
    try:
        with torch.no_grad():
            for b in batches:
                mask = b.get("attention_mask")
                keep[0] = mask.reshape(-1).bool() if mask is not None else None
                net(input_ids=b["input_ids"], attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    return {n: s / max(1, counts[n]) for n, s in sums.items()}


def calibrate_gptq(net: nn.Module, batches, damp: float = 0.01, log=print) -> int:
    """Re-round every 4-bit linear layer of ``net`` (loaded by lowbit from a full-precision checkpoint) with GPTQ's
    error compensation under its calibration inputs. Returns the number of layers changed."""
    hessians = input_second_moments(net, batches)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, Linear4bit) and n in hessians}
    with SourceWeights(net) as source:
        for name, mod in layers.items():
            old = mod.weight  # the checkpoint's dtype first, as round-to-nearest quantized it
            q = gptq_quantize(source(name).to(old.dtype), hessians[name], old.quant_type, old.blocksize,
                              old.double_quant, damp)
            mod.weight = dataclasses.replace(q, dtype=old.dtype)
    log(f"calibration: {len(layers)} layers re-rounded (GPTQ on the NF4 grid)")
    return len(layers)
