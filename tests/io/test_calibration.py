"""GPTQ calibration of a loaded 4-bit model: every layer re-rounded on the same grid (same constants), the
model's logits closer to the full-precision model's on held-out inputs than round-to-nearest's, and the
checkpoint still the bitsandbytes layout."""

import torch

from lowbit.io.calibration import calibrate_gptq, input_second_moments
from lowbit.io.loader import load
from lowbit.nn.linear import Linear4bit

from tiny import save_tiny


def _batches(n, seed, t=24):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 256, (4, t), generator=g)} for _ in range(n)]


def test_calibrated_model_is_closer_to_full_precision(tmp_path):
    ref = save_tiny(tmp_path, "llama").float().eval()
    rtn = load(tmp_path, compute_dtype=torch.float32).eval()
    cal = load(tmp_path, compute_dtype=torch.float32).eval()
    assert calibrate_gptq(cal, _batches(16, 0), log=lambda *a: None) == sum(isinstance(m, Linear4bit)
                                                                             for m in cal.modules())
    held = _batches(4, 1)
    with torch.no_grad():
        want = [ref(**b).logits for b in held]

        def err(net):
            return sum(((net(**b).logits - w).norm() / w.norm()).item() for b, w in zip(held, want))

        assert err(cal) < 0.9 * err(rtn), (err(cal), err(rtn))
    for (name, a), (_, b) in zip(rtn.named_modules(), cal.named_modules()):
        if isinstance(a, Linear4bit):  # same grid: only the codes moved
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.nested_absmax, b.nested_absmax), name
            assert a.weight.dtype == b.weight.dtype


def test_second_moments_leave_padding_out(tmp_path):
    save_tiny(tmp_path, "llama")
    net = load(tmp_path, compute_dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    padded = input_second_moments(net, [{"input_ids": ids, "attention_mask": mask}])
    garbage = ids.clone()
    garbage[1, 6:] = 7  # what sits in the padding must not matter
    again = input_second_moments(net, [{"input_ids": garbage, "attention_mask": mask}])
    assert all(torch.allclose(padded[k], again[k]) for k in padded)
