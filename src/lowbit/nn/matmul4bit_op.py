"""The frozen 4-bit matmul as a PyTorch custom operator, so that ``torch.compile`` keeps a decoder layer in one
graph around it (an opaque ``lowbit::matmul_4bit`` node) instead of breaking the graph at every linear layer.

    forward   lowbit::matmul_4bit(x, Q)        y  = x · deq(Q)ᵀ           (+ b outside, in the graph)
    backward  lowbit::matmul_4bit_t(∂y, Q)     ∂x = ∂y · deq(Q)

Same arithmetic as ``linear._Matmul4bit`` (the eager path, which stays the reference): deq(Q) in the reused scratch
buffer, the product in ``dtype`` (``row_chunks.base_matmul``). Q travels as its tensors plus its layout (shape,
blocksize, double-quantization constants, zero points); the codebook decides the code width. Only compiled code calls
these.
"""

from __future__ import annotations

import torch

from ..quant.tensor import QuantizedTensor
from .row_chunks import base_matmul

__all__ = ["matmul_4bit"]


def _tensor(codes, absmax, code, nested_absmax, nested_code, shape, blocksize, nested_offset, nested_blocksize,
            zeros):
    """The ``QuantizedTensor`` the operator's arguments hold (what dequantizing needs: the codebook gives the code
    width, so the type's name and the original dtype are not carried)."""
    double = nested_absmax is not None
    nested_offset = None if nested_offset is None else float(nested_offset)  # a host tensor: no device sync
    return QuantizedTensor(codes, absmax if double else absmax.view(torch.float32), torch.Size(shape),
                           torch.float32, blocksize, "", code.view(torch.float32),
                           nested_absmax.view(torch.float32) if double else None,
                           nested_code.view(torch.float32) if double else None, nested_offset, nested_blocksize,
                           zeros)


@torch.library.custom_op("lowbit::matmul_4bit", mutates_args=())
def _forward(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
             nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, shape: list[int], blocksize: int,
             nested_offset: torch.Tensor | None, nested_blocksize: int, zeros: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    from .linear import _dequantized

    q = _tensor(codes, absmax, code, nested_absmax, nested_code, shape, blocksize, nested_offset, nested_blocksize,
                zeros)
    return base_matmul(x.to(dtype), _dequantized(q, dtype).t())


@_forward.register_fake
def _(x, codes, absmax, code, nested_absmax, nested_code, shape, blocksize, nested_offset, nested_blocksize, zeros,
      dtype):
    return x.new_empty((*x.shape[:-1], shape[0]), dtype=dtype)


@torch.library.custom_op("lowbit::matmul_4bit_t", mutates_args=())
def _grad_input(gy: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None, shape: list[int],
                blocksize: int, nested_offset: torch.Tensor | None, nested_blocksize: int,
                zeros: torch.Tensor | None, dtype: torch.dtype, x_dtype: torch.dtype) -> torch.Tensor:
    from .linear import _dequantized

    q = _tensor(codes, absmax, code, nested_absmax, nested_code, shape, blocksize, nested_offset, nested_blocksize,
                zeros)
    return base_matmul(gy.to(dtype), _dequantized(q, dtype)).to(x_dtype)


@_grad_input.register_fake
def _(gy, codes, absmax, code, nested_absmax, nested_code, shape, blocksize, nested_offset, nested_blocksize, zeros,
      dtype, x_dtype):
    return gy.new_empty((*gy.shape[:-1], shape[1]), dtype=x_dtype)


def _setup(ctx, inputs, output):
    x, *q, dtype = inputs
    ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x.dtype


def _backward(ctx, gy):
    return (_grad_input(gy, *ctx.q, ctx.dtype, ctx.x_dtype),) + (None,) * 11


_forward.register_autograd(_backward, setup_context=_setup)


def matmul_4bit(x: torch.Tensor, layer, dtype: torch.dtype) -> torch.Tensor:
    """x · deq(Q)ᵀ in ``dtype`` for a ``Linear4bit`` through the custom operator (what it calls under
    ``torch.compile``). Reads the layer's byte storage, not its ``weight`` view: the per-layer double-quantization
    offset then reaches the graph as data (``layer._offset``) rather than as a constant compiled into it."""
    lay = layer._layout
    return _forward(x, layer.codes, layer.absmax, layer.code, layer.nested_absmax, layer.nested_code,
                    list(lay.shape), lay.blocksize, layer._offset, lay.nested_blocksize, layer.zeros, dtype)
