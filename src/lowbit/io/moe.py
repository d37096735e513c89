"""Loading mixture-of-experts layers: each of transformers' fused experts modules becomes an ``nn.experts.Experts``
of per-expert layers, read from the checkpoint one expert at a time — per-expert tensors, as hub checkpoints
store them (found through ``CheckpointNames``), or slices of fused ones.

    gate_up_proj[e] = [gate_e ; up_e]    (E × 2I × H),    down_proj[e] = down_e    (E × H × I)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.experts import ExpertMLP, Experts, fused_experts_problem, is_fused_experts
from .checkpoint_names import CheckpointNames
from .safetensors import Reader

__all__ = ["expert_matrix", "load_experts"]


def expert_matrix(reader: Reader, names: CheckpointNames, fused_name: str, e: int) -> tuple[str, torch.Tensor]:
    """(checkpoint key, weight) of expert ``e``'s slice of fused parameter ``fused_name``: the slice of the fused
    tensor, or its per-expert parts (``w1``, ``w3`` …) stacked in fusing order."""
    sources = names.experts(fused_name)
    if sources is None:  # stored fused
        key = names.key(fused_name)
        if key not in reader:
            raise LowbitError(f"checkpoint has no tensor {key!r} (nor per-expert ones)")
        return f"{key}[{e}]", reader.get(key)[e]
    keys = [s.format(e=e) for s in sources]
    for k in keys:
        if k not in reader:
            raise LowbitError(f"checkpoint has no tensor {k!r}")
    return keys[0], torch.cat([reader.get(k) for k in keys])


def load_experts(net: nn.Module, reader: Reader, names: CheckpointNames,
                 make_linear: Callable[[str, torch.Tensor], nn.Module]) -> int:
    """Replace every fused experts module of ``net`` (on the meta device) by per-expert layers made with
    ``make_linear(checkpoint key, weight out × in)``. Returns how many experts were loaded."""
    loaded = 0
    for name, mod in list(net.named_modules()):
        if not is_fused_experts(mod):
            continue
        problem = fused_experts_problem(mod)
        if problem:
            raise LowbitError(f"{name}: {problem}")
        experts = []
        for e in range(mod.gate_up_proj.shape[0]):
            layers = []
            for m in ("gate_up_proj", "down_proj"):
                key, w = expert_matrix(reader, names, f"{name}.{m}", e)
                shape = tuple(getattr(mod, m).shape[1:])
                if tuple(w.shape) != shape:
                    raise LowbitError(f"{key}: checkpoint shape {tuple(w.shape)} does not match the config's {shape}")
                layers.append(make_linear(key, w))
            experts.append(ExpertMLP(*layers, mod.act_fn))
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, Experts(experts, template=mod))
        loaded += len(experts)
    return loaded
