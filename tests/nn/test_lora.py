"""LoRA: targeting by names, regex and all-linear; starting at the base; LoftQ init."""

import re

import pytest
import torch

from lowbit.io.loader import SourceWeights, load
from lowbit.nn.lora import LoRALinear, add_lora
from lowbit.quant.spec import QuantSpec

from tiny import random_ids as _ids

F32 = torch.float32


def test_lora_targets_names_regex_all_linear(tiny, capsys):
    path, _ = tiny
    m = load(path, compute_dtype=F32)
    names = add_lora(m, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    assert len(names) == 4 and all(re.search(r"(q|v)_proj$", n) for n in names)
    assert "trainable parameters" in capsys.readouterr().out
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    m2 = load(path, compute_dtype=F32)
    assert len(add_lora(m2, r=4, target_modules=r".*\.mlp\..*_proj", verbose=False)) == 6
    m3 = load(path, compute_dtype=F32)
    assert len(add_lora(m3, r=4, target_modules="all-linear", verbose=False)) == 14
    assert not isinstance(m3.lm_head, LoRALinear)


def test_lora_bad_targets_and_ranks(tiny):
    path, _ = tiny
    m = load(path, compute_dtype=F32)
    with pytest.raises(ValueError, match=r"no linear layer named 'qproj'.*q_proj"):
        add_lora(m, target_modules=["qproj"])
    with pytest.raises(ValueError, match="positive"):
        add_lora(m, r=0)
    with pytest.raises(ValueError, match="lora_r=1000 is larger than every linear layer"):
        add_lora(m, r=1000)  # all-linear leaves out layers narrower than r, but not all of them
    with pytest.raises(ValueError, match="larger than the layer"):
        add_lora(m, r=1000, target_modules="q_proj")


def test_lora_starts_at_base_and_trains(tiny):
    path, _ = tiny
    m = load(path, compute_dtype=F32)
    ids = _ids(4, 16)
    with torch.no_grad():
        before = m(ids).logits
    add_lora(m, r=8, alpha=16, verbose=False)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, before), "B = 0 must leave the model unchanged"
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    losses = []
    for _ in range(15):  # a plain PyTorch loop over the model
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_loftq_init_recovers_quantization_error(tiny):
    path, _ = tiny
    plain = load(path, None, compute_dtype=F32)
    w = plain.model.layers[0].mlp.up_proj.weight.detach().float()
    m = load(path, QuantSpec("nf2"), compute_dtype=F32)
    before = (m.model.layers[0].mlp.up_proj.dequantize() - w).norm()
    with SourceWeights(m) as src:  # the full-precision weights, read from the checkpoint a layer at a time
        add_lora(m, r=16, alpha=16, init="loftq", loftq_iters=2, verbose=False, source_weight=src)
    lora = m.model.layers[0].mlp.up_proj
    after = (lora.base_weight() + lora.delta_weight() - w).norm()
    assert after < 0.8 * before
    assert not hasattr(lora.base, "source_weight")
