"""Per-expert layers compute exactly what transformers' fused experts do; fused() and state_dict give them back."""

import pytest
import torch
from torch import nn

from lowbit.nn.experts import ExpertMLP, Experts, fused_experts_problem
from lowbit.nn.linear import Linear4bit
from lowbit.quant.tensor import quantize

from tiny import tiny_config


def _fused(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.model.layers[0].mlp.experts.eval()


def _split(mod, make=lambda w: _linear(w)):
    return Experts([ExpertMLP(make(mod.gate_up_proj[e].detach()), make(mod.down_proj[e].detach()), mod.act_fn)
                    for e in range(mod.gate_up_proj.shape[0])], template=mod)


def _linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_experts_equal_transformers_fused_module(arch):
    fused = _fused(arch)
    with torch.no_grad():
        fused.gate_up_proj.normal_(0, 0.1)
        fused.down_proj.normal_(0, 0.1)
    n = fused.gate_up_proj.shape[0]
    x = torch.randn(10, fused.gate_up_proj.shape[2])
    idx = torch.randint(0, n, (10, 2))
    w = torch.rand(10, 2)
    with torch.no_grad():
        want = fused(x, idx, w)
        got = _split(fused)(x, idx, w)
    assert torch.allclose(got, want, atol=1e-6)


def test_fused_and_state_dict_give_transformers_tensors_back():
    fused = _fused("mixtral")
    gate_up, down = fused.gate_up_proj.detach().clone(), fused.down_proj.detach().clone()
    experts = _split(fused, lambda w: Linear4bit(quantize(w), compute_dtype=torch.float32))
    sd = experts.state_dict(prefix="experts.")
    assert set(sd) == {"experts.gate_up_proj", "experts.down_proj"}
    deq = torch.stack([quantize(gate_up[e]).dequantize() for e in range(len(experts))])
    assert torch.equal(sd["experts.gate_up_proj"], deq)
    back = experts.fused(torch.float32)
    assert back is fused and torch.equal(back.gate_up_proj, deq)
    assert torch.equal(back.down_proj, torch.stack([quantize(d).dequantize() for d in down]))


def test_backward_reaches_adapters_through_routing():
    from lowbit.nn.lora import add_lora

    fused = _fused("qwen3_moe")
    holder = nn.Module()
    holder.experts = _split(fused)
    names = add_lora(holder, r=2, alpha=4, target_modules="all-linear+experts", verbose=False)
    assert len(names) == 2 * len(holder.experts)
    for m in holder.modules():
        if hasattr(m, "lora_B"):
            nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(6, fused.gate_up_proj.shape[2])
    idx = torch.tensor([[0, 1]] * 6)
    holder.experts(x, idx, torch.ones(6, 2)).sum().backward()
    grads = {n: p.grad for n, p in holder.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".0." in n or ".1." in n)
    assert all(g is None for n, g in grads.items() if ".2." in n or ".3." in n)  # never routed to


def test_unusual_fused_experts_are_named():
    fused = _fused("mixtral")
    assert fused_experts_problem(fused) is None
    fused.is_transposed = True
    assert "(is_transposed)" in fused_experts_problem(fused)
    fused.is_transposed, fused.is_concatenated = False, False  # gate and up interleaved
    assert "(is_concatenated)" in fused_experts_problem(fused)
    assert fused_experts_problem(nn.Linear(2, 2)) is None
