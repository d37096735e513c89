"""Expert adapters in peft's form.

lowbit trains one LoRA per expert matrix (``<layer>.experts.<e>.gate_up_proj`` …). peft, on transformers 5's fused
experts, keeps one LoRA per fused 3-D parameter (named in ``target_parameters``) with the experts' factors
stacked, rank r each:

    A[e·r + k, :] = A_e[k, :]      (E·r × in)        B[:, k·E + e] = B_e[:, k]      (out × r·E)
    ΔW_e = s · B_e · A_e

Two parameters of one module nest: peft names the first listed ``<module>.base_layer.lora_A.weight`` and the
second ``<module>.lora_A.weight``. Reading, the matrix is told by its shapes (gate_up: H in, 2I out; down: I in,
H out — never both), so an adapter written by peft in either order reads back. Experts without an adapter of
their own are written as zero factors (ΔW = 0), since peft's stack has every expert.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.experts import EXPERT_MATRICES, Experts
from ..nn.lora import LoRALinear

__all__ = ["PREFIX", "expert_targets", "to_peft", "from_peft"]

PREFIX = "base_model.model."


def expert_targets(net: nn.Module) -> dict[str, list[str]]:
    """{experts module: the expert matrices that carry LoRA, in ``EXPERT_MATRICES`` order} (modules with none
    left out)."""
    found = {}
    for name, mod in net.named_modules():
        if isinstance(mod, Experts):
            mats = [m for m in EXPERT_MATRICES if any(isinstance(getattr(x, m), LoRALinear) for x in mod)]
            if mats:
                found[name] = mats
    return found


def to_peft(net: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(adapter tensors with every expert LoRA stacked as peft stores it, peft's ``target_parameters``)."""
    out, params = dict(tensors), []
    for mod, mats in expert_targets(net).items():
        experts = net.get_submodule(mod)
        for depth, m in enumerate(mats):
            lora = next(getattr(x, m) for x in experts if isinstance(getattr(x, m), LoRALinear))
            a_shape, b_shape = lora.lora_A.weight.shape, lora.lora_B.weight.shape
            a_parts, b_parts = [], []
            for e in range(len(experts)):
                key = f"{PREFIX}{mod}.{e}.{m}"
                a = out.pop(f"{key}.lora_A.weight", None)
                b = out.pop(f"{key}.lora_B.weight", None)
                a_parts.append(torch.zeros(a_shape, device="cpu") if a is None else a)
                b_parts.append(torch.zeros(b_shape, device="cpu") if b is None else b)
            at = f"{PREFIX}{mod}." + "base_layer." * (len(mats) - 1 - depth)
            out[at + "lora_A.weight"] = torch.cat(a_parts).contiguous()
            out[at + "lora_B.weight"] = torch.stack(b_parts, dim=-1).reshape(b_shape[0], -1).contiguous()
            params.append(f"{mod}.{m}")
    return out, params


def _features(layer: nn.Module) -> tuple[int, int]:
    return layer.in_features, layer.out_features


def from_peft(net: nn.Module, tensors: dict[str, torch.Tensor], source="adapter") -> dict[str, torch.Tensor]:
    """The adapter tensors with peft's stacked expert LoRAs split into lowbit's per-expert ones (others as they
    are). ``source`` names the adapter in errors."""
    out = dict(tensors)
    for mod, experts in ((n, m) for n, m in net.named_modules() if isinstance(m, Experts)):
        pattern = re.compile(re.escape(PREFIX + mod) + r"\.(?:base_layer\.)*lora_A(?:\.default)?\.weight")
        shapes = {_features(getattr(experts[0], m)): m for m in EXPERT_MATRICES}
        for ka in [k for k in out if pattern.fullmatch(k)]:
            kb = ka.replace("lora_A", "lora_B")
            if kb not in out:
                raise LowbitError(f"{source}: {ka} has no matching lora_B")
            a, b = out.pop(ka), out.pop(kb)
            n = len(experts)
            m = shapes.get((a.shape[-1], b.shape[0]))
            if m is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] % n or a.shape[0] != b.shape[1]:
                raise LowbitError(f"{source}: {ka} {tuple(a.shape)} / lora_B {tuple(b.shape)} fit none of "
                                  f"{mod}'s {n} experts' matrices")
            r = a.shape[0] // n
            a_e, b_e = a.reshape(n, r, a.shape[-1]), b.reshape(b.shape[0], r, n)
            for e in range(n):
                out[f"{PREFIX}{mod}.{e}.{m}.lora_A.weight"] = a_e[e].contiguous()
                out[f"{PREFIX}{mod}.{e}.{m}.lora_B.weight"] = b_e[:, :, e].contiguous()
    return out
