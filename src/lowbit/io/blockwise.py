"""Block-wise reconstruction of a k-bit model (EfficientQAT's Block-AP, with a LoRA start trained alongside as
ApiQ does), one decoder block at a time.

For block ℓ, with X_q its inputs as the already reconstructed blocks before it make them and Y = F_ℓ(X_fp) the
float block's output on the float model's own inputs (so each block also absorbs the error of those before it)::

    min  over W, t, A, B   E_tokens ‖ F_ℓ(X_q; Ŵ(W, s₀·eᵗ) + (α/r)·B·A) − Y ‖²      (nn/fake_quant.py for Ŵ)

W starts at the float weights (AWQ-scaled when awq ran first), s₀ at the block scales the layer has now (clipped
ones after clip), B·A at LoftQ's start (the top-r SVD of W − Ŵ); Adam over ``epochs`` passes of the calibration
batches, padded positions left out. Then the codes freeze (``FakeQuantLinear.freeze``: scales double-quantized,
codes rounded against them), the block's ``Linear4bit`` layers take them, and X_q moves on through the frozen
block (with the LoRA start). Memory: the model, one block's float weights with their Adam state, and the
calibration hidden states twice (tokens × hidden × 4 bytes each). Experts of MoE blocks keep their codes.
"""

from __future__ import annotations

import math
import random
import time

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.decoder_layers import decoder_layers
from ..nn.fake_quant import FakeQuantLinear
from ..nn.linear import Linear4bit
from ..nn.lora import low_rank_factors

__all__ = ["calibrate_blockwise", "frozen_decoder_layers", "capture_inputs", "Dense", "run_layer", "swap",
           "lora_start_factors"]

LR = {"weight": 3e-4, "log_scale": 5e-3, "lora": 3e-3}  # Adam; tried on NF2 SmolLM2 (README: 2- and 3-bit)


class _Stop(Exception):
    pass


class Dense(nn.Module):
    """x Wᵀ + b with a fixed float weight (the float block, and the frozen block with its LoRA start)."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w.to(x.dtype), None if self.b is None else self.b.to(x.dtype))


def frozen_decoder_layers(net: nn.Module, stage: str) -> list[tuple[str, nn.Module]]:
    """``net``'s decoder layers (refused in one line without), every parameter of ``net`` frozen."""
    layers = decoder_layers(net)
    if not layers:
        raise LowbitError(f"{stage} calibration: the model has no decoder layers transformers marks as such")
    for p in net.parameters():
        p.requires_grad_(False)
    return layers


def capture_inputs(net, layers, batches) -> tuple[list, list[list[dict]]]:
    """The first layer's input and every layer's keyword arguments (masks, positions), per batch."""
    inputs, kwargs = [], [[] for _ in layers]

    def pre(i):
        def hook(_m, args, kw):
            if i == 0:
                inputs.append((args[0] if args else kw["hidden_states"]).detach())
            kwargs[i].append({k: v for k, v in kw.items() if k not in ("hidden_states", "cache", "past_key_values")})
        return hook

    def stop(*_):
        raise _Stop

    handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, (_, m) in enumerate(layers)]
    handles.append(layers[-1][1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for b in batches:
                try:
                    net(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return inputs, kwargs


def run_layer(layer, x, kw):
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def swap(layer: nn.Module, mods: dict[str, nn.Module]) -> None:
    """Put ``mods`` in place of the layer's submodules of those names."""
    for name, mod in mods.items():
        parent, _, child = name.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, child, mod)


def lora_start_factors(w: torch.Tensor, q: torch.Tensor, r: int, scaling: float) -> tuple:
    """LoftQ's start for W ≈ Q + s·B·A (``nn/lora.loftq_init``'s first round)."""
    a, b = low_rank_factors(w - q, r)
    return a / math.sqrt(scaling), b / math.sqrt(scaling), scaling


def _mse(out, y, mask) -> torch.Tensor:
    d = (out.float() - y.float()).pow(2).mean(-1)
    return (d * mask).sum() / mask.sum().clamp(min=1)


def calibrate_blockwise(net: nn.Module, batches, weights, log=print, lora=None, epochs: int = 2,
                        seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reconstruct every decoder block's 4-bit layers of ``net`` in place (``weights``: name → float weight).
    ``lora``: ``(r, scaling, names)`` to train a LoRA start on the layers ``names`` too. Returns name → (A, B)
    of that start (empty without)."""
    layers, t0 = frozen_decoder_layers(net, "blockwise"), time.perf_counter()
    x_q, kws = capture_inputs(net, layers, batches)
    x_fp = list(x_q)
    masks = [(b["attention_mask"] if b.get("attention_mask") is not None else torch.ones_like(b["input_ids"]))
             .to(x.device).float() for b, x in zip(batches, x_q)]
    rng, starts, report = random.Random(seed), {}, []
    for i, (prefix, layer) in enumerate(layers):
        names = [n for n, m in layer.named_modules() if isinstance(m, Linear4bit)]
        if not names:
            x_q = [run_layer(layer, x, kw) for x, kw in zip(x_q, kws[i])]
            continue
        mods = {n: layer.get_submodule(n) for n in names}
        w = {n: weights(f"{prefix}.{n}").to(mods[n].codes.device).float() for n in names}
        bias = {n: None if mods[n].bias is None else mods[n].bias.detach() for n in names}
        swap(layer, {n: Dense(w[n], bias[n]) for n in names})
        with torch.no_grad():
            y = [run_layer(layer, x, kw) for x, kw in zip(x_fp, kws[i])]
        fq = {n: FakeQuantLinear(w[n], mods[n].weight.absmax_float().float(), mods[n].weight.spec, bias[n],
                                 lora_start_factors(w[n], mods[n].dequantize(), lora[0], lora[1])
                                 if lora and f"{prefix}.{n}" in lora[2] else None, mods[n].weight.zeros)
              for n in names}
        swap(layer, fq)
        before = _train_block(layer, fq, x_q, y, kws[i], masks, epochs, rng)
        frozen = {}
        for n in names:
            mods[n].weight = fq[n].freeze(mods[n].weight.dtype)
            dense = mods[n].dequantize()
            if fq[n].lora_A is not None:
                starts[f"{prefix}.{n}"] = (fq[n].lora_A.detach().clone(), fq[n].lora_B.detach().clone())
                dense = dense + fq[n].scaling * fq[n].lora_B.detach() @ fq[n].lora_A.detach()
            frozen[n] = Dense(dense, bias[n])
        swap(layer, frozen)
        with torch.no_grad():
            x_q = [run_layer(layer, x, kw) for x, kw in zip(x_q, kws[i])]
            report.append((before, float(sum(_mse(a, b, m) for a, b, m in zip(x_q, y, masks)) / len(y))))
        swap(layer, mods)
        x_fp = y
        del fq, frozen, w
    first, last = report[0], report[-1]
    log(f"calibration: {len(report)} blocks reconstructed in {time.perf_counter() - t0:.0f} s ({epochs} epochs of "
        f"{len(batches)} batches; output MSE of block 1 {first[0]:.3g} → {first[1]:.3g}, of block {len(report)} "
        f"{last[0]:.3g} → {last[1]:.3g}{', with a LoRA start' if lora else ''})")
    net.lowbit_blockwise_report = report
    return starts


def _train_block(layer, fq, x_q, y, kws, masks, epochs, rng) -> float:
    """Adam on the block's latent weights, log-scales and LoRA start; returns the output MSE before (the mean over
    the calibration batches)."""
    groups = {"weight": [], "log_scale": [], "lora": []}
    for m in fq.values():
        groups["weight"].append(m.weight)
        groups["log_scale"].append(m.log_scale)
        groups["lora"] += [p for p in (m.lora_A, m.lora_B) if p is not None]
    opt = torch.optim.Adam([{"params": p, "lr": LR[k]} for k, p in groups.items() if p])
    with torch.no_grad():
        before = sum(float(_mse(run_layer(layer, x, kw), t, m)) for x, t, kw, m in zip(x_q, y, kws, masks)) / len(y)
    for _ in range(epochs):
        order = list(range(len(x_q)))
        rng.shuffle(order)
        for j in order:
            loss = _mse(run_layer(layer, x_q[j], kws[j]), y[j], masks[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return before
