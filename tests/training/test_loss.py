"""The training loss: chunked cross-entropy equals the plain one, value and gradients."""


import pytest
import torch

from lowbit.io.loader import load
from lowbit.training import loss as loss_mod


def test_chunked_loss_matches_plain_cross_entropy(setup):
    from lowbit.nn.lora import LoRALinear, add_lora

    root, model_dir, _ = setup
    m = load(model_dir, compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    params = [p for p in m.parameters() if p.requires_grad]
    s, n = loss_mod.lm_loss(m, batch, chunk_tokens=7)  # several chunks, the last one partial
    g1 = torch.autograd.grad(s, params)
    logits = m(input_ids=ids).logits[:, :-1].reshape(-1, m.config.vocab_size)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    g2 = torch.autograd.grad(ref, params)
    assert n == int((labels[:, 1:] != -100).sum())
    assert s.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
