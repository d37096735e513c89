"""The base matmul in row chunks: the same product as one matmul, used only where the rule says, and the 4-bit layer
(eager and through the custom operator) computing with it."""

import pytest
import torch

from lowbit.nn.row_chunks import CHUNK_ROWS, base_matmul, reference_matmul, row_chunk
from lowbit.quant.tensor import quantize

CPU = torch.device("cpu")


def test_the_rule_chunks_narrow_bf16_cpu_products_of_many_rows_only():
    assert row_chunk(1024, 576, torch.bfloat16, CPU) == CHUNK_ROWS
    assert row_chunk(2 * CHUNK_ROWS - 1, 576, torch.bfloat16, CPU) == 0  # one chunk would be the whole product
    assert row_chunk(1024, 1536, torch.bfloat16, CPU) == 0               # wide outputs run faster whole
    assert row_chunk(1024, 192, torch.bfloat16, CPU) == 0
    assert row_chunk(1024, 576, torch.float32, CPU) == 0
    assert row_chunk(1024, 576, torch.bfloat16, torch.device("meta")) == 0


@pytest.mark.parametrize("rows", [1024, 1000, 1537])
def test_chunked_product_matches_one_product(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=g).to(torch.bfloat16).view(1, rows, 96)
    w = torch.randn(96, 576, generator=g).to(torch.bfloat16)
    got, want = base_matmul(x, w), reference_matmul(x, w)
    assert got.shape == want.shape == (1, rows, 576) and got.is_contiguous()
    # each row is one dot product per column either way: only the library's blocking may differ
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert (got.float() - want.float()).abs().max() <= 2 ** -6 * want.float().abs().max()


def test_products_that_need_autograd_are_never_chunked():
    x = torch.randn(1024, 64, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 576, dtype=torch.bfloat16)
    y = base_matmul(x, w)
    y.float().sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(1024, 576, dtype=torch.bfloat16) @ w.t())


def test_the_4bit_layer_uses_it_forward_and_backward(monkeypatch):
    """Eager ``Linear4bit`` and the compiled path's operator agree with a plain product of the dequantized weight."""
    from lowbit.nn import linear, matmul4bit_op
    from lowbit.nn.linear import Linear4bit

    calls = []
    for mod in (linear, matmul4bit_op):
        monkeypatch.setattr(mod, "base_matmul", lambda a, b: calls.append(a.shape) or base_matmul(a, b))
    w = torch.randn(576, 128, generator=torch.Generator().manual_seed(0))
    layer = Linear4bit(quantize(w, "nf4"), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 512, 128, dtype=torch.bfloat16, requires_grad=True)
    deq = layer.weight.dequantize(torch.bfloat16)
    for run in (layer, lambda t: matmul4bit_op.matmul_4bit(t, layer, torch.bfloat16)):
        x.grad, calls[:] = None, []
        y = run(x)
        y.float().square().sum().backward()
        assert len(calls) == 2  # the forward product and the input gradient's
        torch.testing.assert_close(y, base_matmul(x.detach(), deq.t()))
        torch.testing.assert_close(x.grad, base_matmul((2 * y.float()).to(torch.bfloat16), deq), rtol=2e-2, atol=2e-2)


def test_the_8bit_layer_uses_it_forward_and_backward(monkeypatch):
    from lowbit.nn import linear8bit
    from lowbit.nn.linear8bit import Linear8bit
    from lowbit.quant.int8 import dequantize_int8, quantize_int8

    calls = []
    monkeypatch.setattr(linear8bit, "base_matmul", lambda a, b: calls.append(a.shape) or base_matmul(a, b))
    q, scb = quantize_int8(torch.randn(576, 128, generator=torch.Generator().manual_seed(1)))
    layer = Linear8bit(q, scb, compute_dtype=torch.bfloat16)
    x = torch.randn(2, 512, 128, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert len(calls) == 2
    torch.testing.assert_close(y, base_matmul(x.detach(), dequantize_int8(q, scb, torch.bfloat16).t()))
