"""End-to-end pass over a calibrated k-bit model (RILQ; EfficientQAT's E2E-QP): the codes frozen, every layer's
block scales (``nn/block_scales.py``) and the LoRA start trained so that the whole model's output matches the
float model's on the calibration inputs::

    L = KL(p_fp ‖ p_q) + ‖h_q − h_fp‖² / ‖h_fp‖²        per token, padded positions left out

h: the final hidden states as the output head reads them (after the final norm); p = softmax(head(h)), the head
being the model's own (not quantized). The float model's h_fp is computed once, block by block with each block's
float weights (memory: one block), as ``blockwise.py`` does. Labels are never read: the pass recovers the float
model, it does not learn the task. Adam over at most ``epochs`` passes of 7/8 of the calibration batches; the
held-out 1/8 is scored before training and after each pass and the best state kept (early stopping: the first
pass that does not improve on it ends the training). Then the scales are stored (double-quantized) over the same
codes. Memory: the model, its scales' Adam state (3 floats per block) and one batch's full-vocabulary logits.
"""

from __future__ import annotations

import random
import time

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.block_scales import fold_block_scales, train_block_scales
from ..nn.linear import Linear4bit
from .blockwise import Dense, capture_inputs, frozen_decoder_layers, lora_start_factors, run_layer, swap

__all__ = ["calibrate_e2e"]

LR = {"scale": 5e-4, "lora": 2e-4}  # Adam; chosen on SmolLM2 NF2 by the held-out calibration loss (README)


def _float_outputs(net, layers, batches, weights) -> list[torch.Tensor]:
    """The last decoder layer's output of the float model, per batch (each block run with its float weights)."""
    x, kws = capture_inputs(net, layers, batches)
    for i, (prefix, layer) in enumerate(layers):
        mods = {n: m for n, m in layer.named_modules() if isinstance(m, Linear4bit)}
        swap(layer, {n: Dense(weights(f"{prefix}.{n}").to(m.codes.device).float(),
                              None if m.bias is None else m.bias.detach()) for n, m in mods.items()})
        with torch.no_grad():
            x = [run_layer(layer, h, kw) for h, kw in zip(x, kws[i])]
        swap(layer, mods)
    return x


class _Head:
    """Reads the output head's input (all positions) in a forward and, optionally, puts the float model's last-layer
    output in place of the quantized one's (to read the float model's head input)."""

    def __init__(self, net, last: nn.Module):
        self.head, self.last, self.seen = net.get_output_embeddings(), last, None
        if self.head is None:
            raise LowbitError("e2e calibration: the model has no output head transformers can name")

    def run(self, net, batch, replace=None) -> torch.Tensor:
        def read(_m, args):  # the head then computes one position's logits only (the loss makes its own)
            self.seen = args[0]
            return (args[0][..., :1, :], *args[1:])

        def put(_m, _args, out):
            return (replace, *out[1:]) if isinstance(out, tuple) else replace

        hooks = [self.head.register_forward_pre_hook(read)]
        if replace is not None:
            hooks.append(self.last.register_forward_hook(put))
        try:
            net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return self.seen


def _loss(head: nn.Module, h: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h, target = h[keep], target[keep]
    log_q = torch.log_softmax(head(h).float(), -1)
    log_p = torch.log_softmax(head(target).float(), -1)
    kl = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="sum") / max(1, h.shape[0])
    return kl + (h.float() - target.float()).pow(2).sum() / target.float().pow(2).sum().clamp(min=1e-12)


def _lora_hooks(net, lora, starts, weights) -> tuple[dict, list]:
    """LoRA start parameters (name → (A, B)) added to the outputs of the layers ``lora`` names, and the hooks."""
    if not lora:
        return {}, []
    r, scaling, names = lora
    params, hooks = {}, []
    for name in sorted(names):
        mod = net.get_submodule(name)
        if not isinstance(mod, Linear4bit):
            continue
        a, b = starts.get(name) or lora_start_factors(weights(name).to(mod.codes.device).float(),
                                                     mod.dequantize(), r, scaling)[:2]
        pa, pb = nn.Parameter(a.detach().float().clone()), nn.Parameter(b.detach().float().clone())
        params[name] = (pa, pb)

        def add(_m, args, out, pa=pa, pb=pb):
            x = args[0]
            return out + scaling * ((x @ pa.to(x.dtype).T) @ pb.to(x.dtype).T)

        hooks.append(mod.register_forward_hook(add))
    return params, hooks


def calibrate_e2e(net: nn.Module, batches, weights, log=print, lora=None, starts=None, epochs: int = 4,
                  seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train ``net``'s block scales (and a LoRA start: ``lora`` = ``(r, scaling, names)``, starting from
    ``starts`` where given, else LoftQ's) end to end against the float model (``weights``: name → float weight).
    Returns name → (A, B) of the LoRA start (empty without ``lora``)."""
    layers, t0 = frozen_decoder_layers(net, "e2e"), time.perf_counter()
    head = _Head(net, layers[-1][1])
    with torch.no_grad():
        floats = _float_outputs(net, layers, batches, weights)
        targets = [head.run(net, b, y).detach() for b, y in zip(batches, floats)]
    keeps = [(b["attention_mask"] if b.get("attention_mask") is not None else torch.ones_like(b["input_ids"]))
             .to(t.device).bool() for b, t in zip(batches, targets)]
    loss = lambda j: _loss(head.head, head.run(net, batches[j]), targets[j], keeps[j])
    held = max(1, len(batches) // 8) if len(batches) > 1 else 0
    split = list(range(len(batches) - held)), list(range(len(batches) - held, len(batches)))
    groups = [{"params": train_block_scales(net), "lr": LR["scale"]}]
    params, hooks = _lora_hooks(net, lora, starts or {}, weights)
    if params:
        groups.append({"params": [p for pair in params.values() for p in pair], "lr": LR["lora"]})
    try:
        losses = _fit(loss, groups, split[0], split[1] or split[0], epochs, random.Random(seed))
        fold_block_scales(net)
        with torch.no_grad():
            losses.append(sum(float(loss(j)) for j in split[1] or split[0]) / len(split[1] or split[0]))
    finally:
        for h in hooks:
            h.remove()
        for m in net.modules():  # (left only when the training failed)
            if isinstance(m, Linear4bit):
                m.scale_log = None
    log(f"calibration: e2e pass in {time.perf_counter() - t0:.0f} s ({len(losses) - 2} epochs of {len(split[0])} "
        f"batches; held-out loss (KL + relative MSE of the final hidden states) {losses[0]:.4g} → best "
        f"{min(losses[:-1]):.4g}, {losses[-1]:.4g} with the scales stored{', with a LoRA start' if params else ''})")
    net.lowbit_e2e_report = losses
    return {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in params.items()}


def _fit(loss, groups: list[dict], train_idx: list[int], held_idx: list[int], epochs: int, rng) -> list[float]:
    """Adam over ``train_idx`` for at most ``epochs`` passes; the parameters left at their best held-out loss.
    Returns the held-out loss before training and after each pass."""
    opt, trained = torch.optim.Adam(groups), [p for g in groups for p in g["params"]]

    def score() -> float:
        with torch.no_grad():
            return sum(float(loss(j)) for j in held_idx) / len(held_idx)

    losses = [score()]
    kept = [p.detach().clone() for p in trained]
    for _ in range(epochs):
        rng.shuffle(train_idx)
        for j in train_idx:
            opt.zero_grad(set_to_none=True)
            loss(j).backward()
            opt.step()
        losses.append(score())
        if losses[-1] >= min(losses[:-1]):
            break
        kept = [p.detach().clone() for p in trained]
    with torch.no_grad():
        for p, k in zip(trained, kept):
            p.copy_(k)
    return losses
