"""Merging: fold LoRA adapters into dequantized weights and write a plain Hugging Face folder.

    W_merged = deq(Q) + s·B·A        (float32, then cast to the output dtype)

Re-quantizing W_merged to 4 bits can erase the fine-tune — the delta is often the size of the NF4 rounding
error — so the default output is 16/32-bit; ``merge_report`` measures how much re-quantizing would cost.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import writing_dir
from ..errors import LowbitError
from ..nn.experts import Experts
from ..nn.linear import Linear4bit
from ..nn.linear8bit import QUANTIZED, Linear8bit
from ..nn.lora import LoRALinear, is_conv1d
from ..quant.spec import QuantSpec
from ..quant.tensor import quantize
from .loader import base_info
from .processor import save_tokenizer_files

__all__ = ["dequantize_model", "merge", "merge_report"]


@torch.no_grad()
def dequantize_model(net: nn.Module, dtype: torch.dtype = torch.float32, merge_adapters: bool = False) -> nn.Module:
    """Give ``net`` back transformers' own float layers (in place): every 4-bit layer becomes an ``nn.Linear``
    (GPT-2's ``Conv1D`` where it was one) holding its dequantized weight, and per-expert layers become
    transformers' fused experts again (unless they carry adapters that are kept).

    ``merge_adapters``: also fold each LoRA adapter into its layer (W + s·B·A), leaving a plain model.
    """
    transposed = base_info(net).transposed if hasattr(net, "lowbit_base") else frozenset()
    replaced: set[str] = set()
    for name, mod in list(net.named_modules()):
        parts = name.split(".")
        if any(".".join(parts[:i]) in replaced for i in range(1, len(parts))):
            continue  # inside a layer replaced already (the base of a merged LoRA layer)
        if isinstance(mod, LoRALinear) and merge_adapters:
            w, bias = mod.base_weight(torch.float32) + mod.delta_weight(), mod.base.bias
            conv = is_conv1d(mod.base) or name in transposed
        elif isinstance(mod, QUANTIZED):  # on its own, or the base of a LoRA layer we keep
            w, bias, conv = mod.dequantize(torch.float32), mod.bias, name in transposed
        else:
            continue
        _replace(net, name, _float_layer(w, bias, dtype, conv))
        replaced.add(name)
    for name, mod in list(net.named_modules()):
        if isinstance(mod, Experts) and not any(isinstance(m, LoRALinear) for m in mod.modules()):
            _replace(net, name, mod.fused(dtype))
    for p in net.parameters():
        if p.is_floating_point() and p.dtype != dtype and not p.requires_grad:
            p.data = p.data.to(dtype)
    return net


def _float_layer(w: torch.Tensor, bias, dtype, conv: bool) -> nn.Module:
    """A frozen float layer computing x·wᵀ + bias: ``nn.Linear``, or GPT-2's ``Conv1D`` (weight stored wᵀ)."""
    if conv:
        from transformers.pytorch_utils import Conv1D

        with torch.device(w.device):  # Conv1D makes its parameters where the default device is
            layer = Conv1D(w.shape[0], w.shape[1]).to(dtype)
        layer.weight.data.copy_(w.t())
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype, device=w.device)
        layer.weight.data.copy_(w)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer.requires_grad_(False)


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)


def merge(net: nn.Module, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
          overwrite: bool = False) -> Path:
    """Fold the adapters into dequantized weights and write a plain Hugging Face folder (no lowbit needed).

    ``tokenizer``: copied into the folder when given (a model folder without one merges all the same), with a
    vision-language model's processor files.
    """
    if not any(isinstance(m, LoRALinear) for m in net.modules()):
        raise LowbitError("the model has no LoRA adapters to merge")
    dequantize_model(net, dtype=dtype, merge_adapters=True)  # every parameter is frozen now, so all are cast
    with writing_dir(out, overwrite) as tmp:
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        net.config.dtype = dtype
        net.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
    return Path(out)


@torch.no_grad()
def merge_report(net: nn.Module, tokenizer=None, quant: QuantSpec = QuantSpec(),
                 prompts=("The capital of France is", "def fibonacci(n):", "Hello! How are you today?")) -> str:
    """How much would re-quantizing the merged weights change the model, next to the adapter's own effect?

    Compares logits on a few prompts (fixed token ids when there is no tokenizer): base (adapter off), with
    adapter, and with W + s·B·A re-quantized (to the base's own format where it is 4-bit, else ``quant``).
    """
    loras = [m for m in net.modules() if isinstance(m, LoRALinear)]
    if tokenizer is not None:
        ids = tokenizer(list(prompts), return_tensors="pt", padding=True)
    else:
        g = torch.Generator().manual_seed(0)
        ids = {"input_ids": torch.randint(0, net.config.vocab_size, (len(prompts), 16), generator=g, device="cpu")}
    run = lambda: net(**ids).logits.float()
    y = run()
    saved = [(m.base, m.scaling) for m in loras]
    for m in loras:
        m.scaling = 0.0
    y_base = run()
    for m, (base, s) in zip(loras, saved):
        m.scaling = s  # the delta is s·B·A
        quant = base.weight.spec if isinstance(base, Linear4bit) else quant
        w = m.base_weight(torch.float32) + m.delta_weight()
        cdt = getattr(base, "compute_dtype", None)
        m.base = Linear8bit.from_weight(w, base.bias, cdt) if isinstance(base, Linear8bit) else \
            Linear4bit(quantize(w, quant), base.bias, compute_dtype=cdt)
        m.scaling = 0.0  # now folded into the re-quantized weight
    y_rq = run()
    for m, (base, s) in zip(loras, saved):
        m.base, m.scaling = base, s
    effect = ((y - y_base).norm() / y_base.norm()).item()
    err = ((y_rq - y).norm() / y.norm()).item()
    ratio = err / max(effect, 1e-12)
    verdict = ("re-quantizing erases much of the fine-tune: deploy the 16-bit merge (or keep the adapter separate)"
               if ratio > 0.5 else "re-quantizing keeps most of the fine-tune")
    return (f"merge report: adapter changes logits by {100 * effect:.2f}%; re-quantizing the merged weights to "
            f"{quant.quant_type} changes them by {100 * err:.2f}% ({ratio:.2f}x the adapter's effect) — {verdict}")
