"""The leaner RMSNorm / SwiGLU backward: the same forward and gradients as transformers' modules."""


import torch

from lowbit.io.loader import load


def test_fused_norm_and_swiglu_match_transformers(tmp_path):
    from lowbit.nn.fused import fuse_modules
    from lowbit.nn.lora import LoRALinear, add_lora

    from tiny import save_tiny

    save_tiny(tmp_path, "llama")
    m = load(tmp_path, compute_dtype=torch.float32)  # load() gives norms and MLPs the lean backward
    fused = [mod for mod in m.modules() if hasattr(mod, "_lowbit_orig_forward")]
    assert len(fused) == 2 * 2 + 1 + 2  # 2 norms + 1 MLP per layer, the final norm
    assert fuse_modules(m) == 0  # idempotent
    add_lora(m, r=4, verbose=False)
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            with torch.no_grad():
                mod.lora_B.weight.normal_(0, 0.05)
    m.train()
    ids = torch.randint(0, 256, (2, 16))
    params = [p for p in m.parameters() if p.requires_grad]
    ours = {mod: mod.forward for mod in fused}
    outs = []
    for use_fused in (True, False):
        for mod in fused:  # switch between ours and transformers' own forward
            mod.forward = ours[mod] if use_fused else mod._lowbit_orig_forward
        loss = m(ids, labels=ids).loss
        outs.append((loss.item(), torch.autograd.grad(loss, params)))
    assert outs[0][0] == outs[1][0], "forward must be bit-identical"
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
