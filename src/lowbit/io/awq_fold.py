"""Activation-aware scaling of a whole loaded model, folded so that it stays an ordinary checkpoint (#14).

Each decoder layer of the LLaMA family shape (q/k/v/o, gate/up/down, two RMS norms) has four places where the
input of some 4-bit layers can be divided by per-channel scales s without changing the model's function:

    input_layernorm           → q_proj, k_proj, v_proj     norm weight g ← g / s;  their columns W ← W · diag(s)
    post_attention_layernorm  → gate_proj, up_proj         likewise
    v_proj                    → o_proj                     v rows (and bias) ÷ s;  o columns × s  (with grouped-
                                                           query attention, one s per kv channel, repeated)
    up_proj                   → down_proj                  up rows ÷ s (act(gate)·up is linear in up);  down × s

``quant/awq.py`` chooses each s on the 4-bit grid from the calibration inputs. The norm weight is stored in its
own dtype, so the columns are scaled by g / round(g / s) — exactly what the rounded weight divides out. A norm
whose output does not scale with its weight (Gemma's 1 + w) is left alone, as are layers of other shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.linear import Linear4bit
from ..quant.awq import search_scales
from .calibration_record import scaled_weight

__all__ = ["Scaled", "awq_groups", "fold_awq"]


@dataclass
class Scaled:
    """Float weights as a transform of the checkpoint's: W' = diag(1/row) · W · diag(col) (per layer name)."""

    source: object                                   # name → float32 weight (e.g. loader.SourceWeights)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)

    def __call__(self, name: str) -> torch.Tensor:
        return scaled_weight(self.source(name).float(), name, self.rows, self.cols)


@dataclass
class Group:
    prev: str            # the norm or linear layer whose output is divided by s
    layers: list[str]    # the 4-bit layers that read it
    repeat: int = 1      # o_proj under grouped-query attention: each kv channel's s serves ``repeat`` heads
    head_dim: int = 0


def _is_linear_norm(norm: nn.Module, width: int) -> bool:
    """An RMS-style norm whose output is proportional to its weight (so g / s divides the output by s)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != (width,):
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, width, generator=g, device="cpu").to(w.device, w.dtype)
    with torch.no_grad():
        y1 = norm(x).float()
        old = w.detach().clone()
        w.data.mul_(2)
        try:
            y2 = norm(x).float()
        finally:
            w.data.copy_(old)
    return bool(torch.allclose(y2, 2 * y1, rtol=1e-2, atol=1e-3))


def awq_groups(net: nn.Module) -> list[Group]:
    """The foldable (prev → layers) places of every LLaMA-shaped decoder layer of ``net``."""
    groups = []
    for name, mod in net.named_modules():
        attn, mlp = getattr(mod, "self_attn", None), getattr(mod, "mlp", None)
        proj = lambda m, k: isinstance(getattr(m, k, None), Linear4bit)
        if attn is None or mlp is None or not all(proj(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj")):
            continue
        a, m = f"{name}.self_attn", f"{name}.mlp"
        hidden = attn.q_proj.in_features
        if _is_linear_norm(getattr(mod, "input_layernorm", None), hidden):
            groups.append(Group(f"{name}.input_layernorm", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"]))
        v, o = attn.v_proj, attn.o_proj
        head_dim = getattr(attn, "head_dim", 0)
        if o.in_features % v.out_features == 0 and head_dim and v.out_features % head_dim == 0:
            groups.append(Group(f"{a}.v_proj", [f"{a}.o_proj"], o.in_features // v.out_features, head_dim))
        if all(proj(mlp, k) for k in ("gate_proj", "up_proj", "down_proj")):
            if _is_linear_norm(getattr(mod, "post_attention_layernorm", None), hidden):
                groups.append(Group(f"{name}.post_attention_layernorm", [f"{m}.gate_proj", f"{m}.up_proj"]))
            groups.append(Group(f"{m}.up_proj", [f"{m}.down_proj"]))
    return groups


def _expand(s: torch.Tensor, g: Group) -> torch.Tensor:
    """kv-channel scales → o_proj's input channels (head h reads kv head h // repeat)."""
    if g.repeat == 1:
        return s
    return s.view(-1, 1, g.head_dim).expand(-1, g.repeat, g.head_dim).reshape(-1)


def _shrink(mean_abs: torch.Tensor, g: Group) -> torch.Tensor:
    return mean_abs if g.repeat == 1 else mean_abs.view(-1, g.repeat, g.head_dim).mean(1).reshape(-1)


def fold_awq(net: nn.Module, stats: dict, source, spec, grid: int = 20, log=print) -> Scaled:
    """Choose every group's scales and fold them into ``net``'s norm weights and biases. Returns the ``Scaled``
    float weights the 4-bit layers must now be quantized from (the caller re-quantizes them)."""
    scaled = Scaled(source)
    gain = []
    groups = awq_groups(net)
    if not groups:
        raise LowbitError("awq: this model has no place to fold scales into (it needs LLaMA-shaped decoder layers: "
                          "q/k/v/o and gate/up/down projections after RMS norms); use method gptq")
    for g in groups:
        if any(n not in stats for n in g.layers):
            continue
        h, mean_abs = stats[g.layers[0]]
        weights = [scaled(n) for n in g.layers]
        s, alpha, err, rtn = search_scales(weights, _shrink(mean_abs, g), h, spec, grid,
                                           expand=lambda t, g=g: _expand(t, g))
        if alpha == 0:
            continue
        prev = net.get_submodule(g.prev)
        if isinstance(prev, Linear4bit):  # divide the previous layer's output rows
            scaled.rows[g.prev] = scaled.rows.get(g.prev, torch.ones_like(s)) * s
            if prev.bias is not None:
                prev.bias.data.copy_((prev.bias.float() / s).to(prev.bias.dtype))
            s_in = _expand(s, g)
        else:  # a norm: its stored weight decides the exact factor the columns get
            w = prev.weight.data
            new = (w.float() / s).to(w.dtype)
            s_in = torch.where(new.float() != 0, w.float() / new.float(), s)
            w.copy_(new)
        for n in g.layers:
            scaled.cols[n] = scaled.cols.get(n, torch.ones_like(s_in)) * s_in
        gain.append(1 - err / rtn if rtn else 0.0)
    log(f"awq: {len(gain)} groups scaled; output error on the calibration inputs "
        f"{100 * sum(gain) / max(1, len(gain)):.1f}% below round-to-nearest on average")
    return scaled
