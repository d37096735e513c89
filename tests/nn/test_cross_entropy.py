"""The chunked head: per-token log-probs and the summed cross-entropy against their plain references."""

import torch
import torch.nn.functional as F

from lowbit.nn.cross_entropy import chunked_cross_entropy, chunked_token_logps


def _case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float32).to(dtype)
    y = torch.randint(0, 50, (37,), generator=g)
    return h, w, y


def test_token_logps_and_their_gradient_equal_log_softmax():
    h, w, y = _case()
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(1))
    got = chunked_token_logps(h, w, y, chunk_tokens=8)  # 5 chunks, the last one short
    (got * upstream).sum().backward()
    g_got = h.grad.clone()
    h.grad = None
    ref = torch.log_softmax(h @ w.t(), dim=-1).gather(1, y[:, None])[:, 0]
    (ref * upstream).sum().backward()
    assert torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(g_got, h.grad, atol=1e-5)


def test_cross_entropy_is_minus_the_summed_log_probs():
    h, w, y = _case()
    got = chunked_cross_entropy(h, w, y, chunk_tokens=8)
    got.backward()
    g_got = h.grad.clone()
    h.grad = None
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum")
    ref.backward()
    assert torch.allclose(got, ref, rtol=1e-5) and torch.allclose(g_got, h.grad, atol=1e-5)
