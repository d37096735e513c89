"""Mixture-of-experts with one linear layer per expert matrix, in place of transformers' fused experts.

transformers 5 keeps a layer's E experts as two 3-D parameters — ``gate_up_proj`` (E × 2I × H) and ``down_proj``
(E × H × I) — and its MoE block calls ``experts(x, top_k_index, top_k_weights)``:

    y[t] = Σ_k  w[t,k] · down_e(act(g) · u),    [g ; u] = gate_up_e(x_t),    e = top_k_index[t,k]

``Experts`` computes the same with a ``Linear4bit`` (or frozen ``nn.Linear``) per expert matrix, named
``experts.<e>.gate_up_proj`` and ``experts.<e>.down_proj``: each expert matrix is quantized on its own
(transformers + bitsandbytes leave experts in 16 bits), LoRA can target experts by name — one adapter per expert
matrix, exactly the per-expert factors of peft's ``target_parameters`` LoRA — and SiLU experts get the leaner
SwiGLU backward of ``fused.py``. ``fused()`` gives transformers' own module back (for merges and exports), and
``state_dict`` reads as that module's (fused float tensors), which is what transformers loads.
"""

from __future__ import annotations

import torch
from torch import nn

from .fused import silu_mul
from .linear import Linear4bit

__all__ = ["ExpertMLP", "Experts", "EXPERT_MATRICES", "fused_experts_problem", "is_fused_experts"]

EXPERT_MATRICES = ("gate_up_proj", "down_proj")
"""The expert matrices of transformers' fused experts (and the names of an ``ExpertMLP``'s layers)."""


def fused_experts_problem(mod: nn.Module) -> str | None:
    """Why ``Experts`` cannot compute transformers' fused experts module ``mod`` exactly (None: it can, or ``mod``
    is no fused experts module)."""
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == down.dim() == 3):
        return None
    layout = {"is_transposed": False, "is_concatenated": True, "has_gate": True, "has_bias": False,
              "has_post_expert_norm": False}  # transformers' use_experts_implementation flags
    odd = [k for k, want in layout.items() if getattr(mod, k, want) != want]
    if getattr(mod, "gate_up_proj_bias", None) is not None:
        odd.append("gate_up_proj_bias")
    gate = getattr(type(mod), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        odd.append("its own _apply_gate")
    if odd or getattr(mod, "act_fn", None) is None or gu.shape[1] != 2 * down.shape[2]:
        return (f"{type(mod).__name__} is not of the concatenated gate_up (E × 2I × H) / down (E × H × I) form with "
                f"act(gate)·up that lowbit reads ({', '.join(odd) or 'shapes'})")
    return None


def is_fused_experts(mod: nn.Module) -> bool:
    """transformers' fused experts: a 3-D ``gate_up_proj`` parameter."""
    gu = getattr(mod, "gate_up_proj", None)
    return isinstance(gu, torch.Tensor) and gu.dim() == 3


class ExpertMLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.act_fn = gate_up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if type(self.act_fn).__name__ in ("SiLU", "SiLUActivation"):
            return self.down_proj(silu_mul(gate, up))
        return self.down_proj(self.act_fn(gate) * up)


def _weight(mod: nn.Module, dtype) -> torch.Tensor:
    """The float weight (out × in) of a Linear4bit, an nn.Linear, or a LoRA layer (base + s·B·A)."""
    from .lora import LoRALinear

    if isinstance(mod, LoRALinear):
        return (mod.base_weight(torch.float32) + mod.delta_weight()).to(dtype)
    if hasattr(mod, "dequantize") and hasattr(mod, "_storage"):  # a 4- or 8-bit layer
        return mod.dequantize(dtype)
    return mod.weight.detach().to(dtype)


class Experts(nn.ModuleList):
    """The experts of one MoE layer: ``self[e]`` is expert e's ``ExpertMLP``. ``template``: the transformers module
    this replaces (kept aside, not a child), rebuilt by ``fused``."""

    def __init__(self, experts: list[ExpertMLP], template: nn.Module):
        super().__init__(experts)
        object.__setattr__(self, "_template", template)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():  # an index of len(self) marks a dropped choice (transformers' eager experts)
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)  # expert, k, token
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit[:, 0].tolist():
            if e == len(self):
                continue
            k, tokens = torch.where(mask[e])
            y = self[e](hidden_states[tokens]) * top_k_weights[tokens, k, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _stacked(self, dtype) -> dict[str, torch.Tensor]:
        return {m: torch.stack([_weight(getattr(x, m), dtype) for x in self]) for m in EXPERT_MATRICES}

    @torch.no_grad()
    def fused(self, dtype=torch.float32) -> nn.Module:
        """transformers' module with fused float parameters (adapters folded in, 4-bit layers dequantized)."""
        t = self._template
        for m, w in self._stacked(dtype).items():
            setattr(t, m, nn.Parameter(w, requires_grad=False))
        return t

    @torch.no_grad()
    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """As transformers' fused module would save it (float, in the compute dtype of the experts)."""
        destination = {} if destination is None else destination
        quantized = [m.compute_dtype for m in self.modules() if isinstance(m, Linear4bit) and m.compute_dtype]
        floats = [p.dtype for p in self.parameters() if p.is_floating_point() and not p.requires_grad]
        for m, w in self._stacked((quantized or floats or [torch.float32])[0]).items():
            destination[prefix + m] = w
        return destination
