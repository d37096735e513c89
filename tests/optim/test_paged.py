"""8-bit and paged AdamW: state codec, agreement with float32 AdamW, pager invariants, checkpoint/resume."""

import copy

import pytest
import torch

from lowbit.io.loader import load
from lowbit.optim import AdamW, make
from lowbit.quant.codebooks import dynamic_map
from lowbit.quant.double_quant import dequantize8, quantize8


def test_unsigned_state_codec_byte_equal_with_bnb(bnbF):
    v = torch.rand(5000) ** 4  # second moments: non-negative, wide range
    q, am = quantize8(v, dynamic_map(False), 256)
    bq, st = bnbF.quantize_blockwise(v, code=bnbF.create_dynamic_map(signed=False), blocksize=256)
    assert torch.equal(q, bq) and torch.equal(am, st.absmax)
    back = dequantize8(q, am, dynamic_map(False), 256)
    assert ((back - v).abs() <= 0.02 * am.repeat_interleave(256)[: v.numel()] + 1e-12).all()


def _problem(seed=0, n=2048, d=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, 96, generator=g)
    y = x @ w_true + 0.01 * torch.randn(n, 96, generator=g)
    return x, y


def _steps(model, opt, x, y, lo, hi):
    """Regression steps lo..hi-1 on 64-row slices of (x, y); the losses."""
    losses = []
    for i in range(lo, hi):
        idx = torch.arange(i * 64, i * 64 + 64) % x.shape[0]
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _fit(opt_fn, steps=60, seed=0):
    torch.manual_seed(seed)
    x, y = _problem()
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 96))
    opt = opt_fn(list(model.parameters()))
    return _steps(model, opt, x, y, 0, steps), model, opt


def test_32bit_equals_torch_adamw():
    a, ma, _ = _fit(lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01))
    b, mb, _ = _fit(lambda p: AdamW(p, lr=3e-3, weight_decay=0.01))
    assert a == pytest.approx(b, rel=1e-5)
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_8bit_tracks_float32_adamw_with_quarter_state():
    ref, _, opt32 = _fit(lambda p: AdamW(p, lr=1e-2), steps=150)
    got, _, opt8 = _fit(lambda p: AdamW(p, lr=1e-2, bits=8, min_8bit_size=1024), steps=150)
    # the curves agree: every loss within 3 % (relative) of float32's (measured: 1.0 % at most)
    assert all(abs(g - r) <= 0.03 * r for g, r in zip(got, ref))
    assert got[-1] < 0.15 * got[0]
    big = sum(p.numel() for p in opt8.state if p.numel() >= 1024)
    small = sum(p.numel() for p in opt8.state if p.numel() < 1024)
    expect = big * (2 + 2 * 4 / 256) + small * 8
    assert opt8.state_bytes() == pytest.approx(expect, rel=0.01)
    assert opt8.state_bytes() < 0.3 * opt32.state_bytes()


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_identical_to_unpaged_and_budget_respected(bits):
    budget = 20_000
    ref, mref, _ = _fit(lambda p: AdamW(p, lr=3e-3, bits=bits, min_8bit_size=1024))
    got, mgot, opt = _fit(lambda p: AdamW(p, lr=3e-3, bits=bits, min_8bit_size=1024, paged=True, budget_bytes=budget))
    assert got == ref
    for a, b in zip(mref.parameters(), mgot.parameters()):
        assert torch.equal(a, b)
    s = opt.stats
    assert 0 < s.peak_resident_bytes <= budget and s.resident_bytes == 0
    assert s.bytes_in == s.bytes_out and s.bytes_in >= 60 * opt.state_bytes()  # every step pages all state through
    assert s.pages > 60 * 4, "large tensors must be split into several pages"


def test_state_survives_checkpoint_and_resume():
    for name in ["adamw_8bit", "paged_adamw", "paged_adamw_8bit"]:
        torch.manual_seed(0)
        x, y = _problem()
        model = torch.nn.Linear(64, 96)
        opt = make(name, list(model.parameters()), lr=3e-3, budget_bytes=30_000, min_8bit_size=1024)

        def run(m, o, lo, hi):
            return _steps(m, o, x, y, lo, hi)

        run(model, opt, 0, 10)
        sd_model, sd_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
        cont = run(model, opt, 10, 20)
        m2 = torch.nn.Linear(64, 96)
        m2.load_state_dict(sd_model)
        o2 = make(name, list(m2.parameters()), lr=3e-3, budget_bytes=30_000, min_8bit_size=1024)
        o2.load_state_dict(sd_opt)
        assert run(m2, o2, 10, 20) == cont, name


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="bits"):
        AdamW(p, bits=4)
    with pytest.raises(ValueError, match="unknown optimizer"):
        make("sgd", p, lr=1e-3)


def test_8bit_tracks_float32_on_tiny_model_finetune(tmp_path):
    from lowbit.nn.lora import add_lora

    from tiny import save_tiny

    save_tiny(tmp_path, "llama")
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    curves = {}
    for bits in (32, 8):
        torch.manual_seed(0)
        m = load(tmp_path, compute_dtype=torch.float32)
        add_lora(m, r=8, alpha=16, verbose=False)
        m.train()
        opt = AdamW([p for p in m.parameters() if p.requires_grad], lr=5e-3, bits=bits, min_8bit_size=256,
                    paged=bits == 8,
                    budget_bytes=8192)
        out = []
        for _ in range(25):
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        curves[bits] = out
    assert curves[32][-1] < 0.7 * curves[32][0]
    assert all(abs(a - b) <= 0.02 * b for a, b in zip(curves[8], curves[32])), (curves[8][-1], curves[32][-1])


def test_paged_8bit_keeps_the_budget_with_float32_state_beside_8bit_state():
    """An 8-bit optimizer keeps float32 state for small tensors: their pages must be sized for 8 bytes an
    element, not 2 (this overran the budget before pages were sized per state width)."""
    big, small = torch.nn.Parameter(torch.randn(8192)), torch.nn.Parameter(torch.randn(2048))
    budget = 12_000
    opt = AdamW([big, small], lr=1e-3, bits=8, paged=True, budget_bytes=budget, min_8bit_size=4096)
    for _ in range(3):
        (big.square().sum() + small.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    assert opt.state[big]["m_q"].dtype == torch.uint8 and opt.state[small]["m"].dtype == torch.float32
    assert 0 < opt.stats.peak_resident_bytes <= budget and opt.stats.resident_bytes == 0
    with pytest.raises(ValueError, match="budget of 1000 bytes is too small"):
        AdamW([big], bits=8, paged=True, budget_bytes=1000)
