"""Calibrated 4-bit weights for a loaded model (#14): the model stays an ordinary 4-bit checkpoint.

``calibrate(net, batches, method)`` with a method of ``quant.spec.CALIBRATIONS`` (stages joined by "+"):

    1. run the 4-bit model over calibration batches; at each ``Linear4bit`` accumulate H = Σ xᵀx / n and
       m = Σ|x| / n of its inputs (as the quantized layers before it make them, as sequential GPTQ sees them)
    2. awq:  choose per-channel scales and fold them into the norms / previous layers (``awq_fold.py``), then
             round the scaled full-precision weights to nearest
       gptq: re-round each layer's full-precision weight (read again from the checkpoint, one layer at a time)
             with error compensation under its H (``quant/gptq.py``), on round-to-nearest's grid
       clip: each block's scale searched below its absmax under diag(H) (``quant/clipping.py``), a new pass
             for H after awq; gptq then rounds on the clipped grid
       blockwise: scales, rounding and a LoRA start trained block by block (``blockwise.py``)
       e2e: the codes frozen, all scales and the LoRA start trained against the float model's output (``e2e.py``)
       both: awq+gptq

Memory: the model, one H per layer (in²·8 bytes: 2.6 MB for SmolLM2's 576-wide inputs) and one float32 weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.linear import Linear4bit
from ..nn.vision import is_vision_model
from ..quant.clipping import clip_scales, quantize_with_scales, start_scales
from ..quant.gptq import gptq_quantize
from ..quant.spec import calibration_stages
from ..quant.tensor import quantize
from .awq_fold import Scaled, fold_awq
from .blockwise import calibrate_blockwise
from .calibration_record import CalibrationRecord
from .e2e import calibrate_e2e
from .loader import SourceWeights

__all__ = ["input_statistics", "calibrate", "calibrate_gptq", "calibrate_awq"]


def input_statistics(net: nn.Module, batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name → (H, m): second moment (float64, in×in) and mean magnitude (float32, in) of the inputs every
    ``Linear4bit`` of ``net`` sees over ``batches`` (dicts with ``input_ids`` and optionally ``attention_mask``;
    padded positions are left out). A batch's xᵀx is a float32 product (exact inputs, ≤ a few thousand tokens),
    summed in float64; layers that read the same tensor (q/k/v, gate/up) share one product per batch."""
    sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    keep: list[torch.Tensor | None] = [None]
    last: list = [None, None]  # the input tensor seen last, and its (xᵀx, Σ|x|, tokens)

    def hook(name):
        def add(_mod, args):
            if args[0] is not last[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                if keep[0] is not None:
                    x = x[keep[0]]
                x = x.float()
                last[:] = [args[0], ((x.T @ x).double(), x.abs().sum(0).double(), x.shape[0])]
            h, a, n = last[1]
            sums[name] = sums.get(name, 0) + h
            abs_sums[name] = abs_sums.get(name, 0) + a
            counts[name] = counts.get(name, 0) + n
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
                last[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
    return {n: (s / max(1, counts[n]), (abs_sums[n] / max(1, counts[n])).float()) for n, s in sums.items()}


def calibrate(net: nn.Module, batches, method: str = "gptq", log=print, lora=None) -> dict:
    """Calibrate every 4-bit layer of ``net`` (loaded by lowbit from a full-precision checkpoint) in place, by the
    stages of ``method`` (``quant.spec.calibration_stages``: awq, clip, gptq, blockwise, e2e, in that order).
    ``net.lowbit_calibration`` then records how (``calibration_record.py``; ``save_quantized`` writes it).
    ``lora``: ``(r, scaling, layer names)`` for blockwise and e2e to train a LoRA start on those layers with the codes;
    returns it (name → (A, B)), empty without."""
    stages = calibration_stages(method, "calibration method")
    if not stages:
        raise LowbitError("calibration method must name at least one stage, got 'none'")
    if is_vision_model(net):
        raise LowbitError(f"calibration ({method}) is not built for vision-language models (their calibration "
                          "inputs would need the images): quantize round-to-nearest (quant_calibration: none)")
    batches = list(batches)
    start = {}
    with SourceWeights(net) as source:
        weights, scales = source, None
        if "awq" in stages:
            with _stage("awq", log):
                weights = calibrate_awq(net, batches, source, log)
        if "clip" in stages:
            with _stage("clip", log):
                scales = calibrate_clip(net, batches, weights, log)
        if "gptq" in stages:
            with _stage("gptq", log):
                calibrate_gptq(net, batches, log=log, weights=weights, scales=scales)
        if "blockwise" in stages:
            start = calibrate_blockwise(net, batches, weights, log=log, lora=lora)  # logs its own time
        if "e2e" in stages:
            start = calibrate_e2e(net, batches, weights, log=log, lora=lora, starts=start)  # logs its own time
        mul = lambda a, b: {k: a.get(k, 1) * b.get(k, 1) for k in a.keys() | b.keys()}
        new = weights if isinstance(weights, Scaled) else Scaled(source)  # scales on top of the source's own
        net.lowbit_calibration = CalibrationRecord(method, source.path, mul(source.rows, new.rows),
                                                   mul(source.cols, new.cols))
    return start


@contextlib.contextmanager
def _stage(name: str, log):
    t0 = time.perf_counter()
    yield
    log(f"calibration: {name} took {time.perf_counter() - t0:.1f} s")


def calibrate_clip(net: nn.Module, batches, weights, log=print) -> dict[str, torch.Tensor]:
    """Clip every 4-bit layer's block scales (``quant/clipping.py``) under the inputs the model now sees and round
    to nearest on them. Returns name → the chosen scales (GPTQ rounds on them next)."""
    stats = input_statistics(net, batches)
    chosen, ratio = {}, []
    for name, mod in net.named_modules():
        if isinstance(mod, Linear4bit) and name in stats:
            old, w = mod.weight, weights(name)
            start, zeros = start_scales(w, old.spec)  # absmax, or range and zero points (kept as they were)
            chosen[name] = clip_scales(w, torch.diagonal(stats[name][0]).float(), old.spec, start=(start, zeros))
            ratio.append(float((chosen[name] / start.clamp(min=1e-38)).mean()))
            mod.weight = dataclasses.replace(quantize_with_scales(w.to(old.dtype), chosen[name], old.spec, zeros),
                                             dtype=old.dtype)
    log(f"calibration: {len(chosen)} layers' block scales clipped (mean scale / round-to-nearest's "
        f"{sum(ratio) / len(ratio):.3f})")
    return chosen


def calibrate_gptq(net: nn.Module, batches, damp: float = 0.01, log=print, weights=None, scales=None) -> int:
    """Re-round every 4-bit linear layer of ``net`` with GPTQ's error compensation under its calibration inputs.
    ``weights``: name → full-precision weight (default: read from the checkpoint ``net`` was loaded from);
    ``scales``: name → block scales to round on (clipped ones) instead of the absmax. Returns the number of layers
    changed."""
    if weights is None:
        with SourceWeights(net) as source:
            return calibrate_gptq(net, batches, damp, log, source)
    stats = input_statistics(net, batches)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, Linear4bit) and n in stats}
    for name, mod in layers.items():
        old = mod.weight  # the checkpoint's dtype first, as round-to-nearest quantized it
        q = gptq_quantize(weights(name).to(old.dtype), stats[name][0], old.quant_type, old.blocksize,
                          old.double_quant, damp, scales=(scales or {}).get(name))
        mod.weight = dataclasses.replace(q, dtype=old.dtype)
    log(f"calibration: {len(layers)} layers re-rounded (GPTQ on the {old.quant_type} grid)")
    return len(layers)


def calibrate_awq(net: nn.Module, batches, source, log=print, grid: int = 20):
    """Fold activation-aware scales into ``net`` (norms, biases) and round its scaled 4-bit layers to nearest.
    Returns the scaled full-precision weights (name → float32), for GPTQ to round next (method "both")."""
    stats = input_statistics(net, batches)
    spec = next(m.weight.spec for m in net.modules() if isinstance(m, Linear4bit))
    scaled = fold_awq(net, stats, source, spec, grid, log)
    for name in sorted(scaled.cols.keys() | scaled.rows.keys()):
        mod = net.get_submodule(name)
        old = mod.weight
        mod.weight = dataclasses.replace(quantize(scaled(name).to(old.dtype), old.spec), dtype=old.dtype)
    return scaled
