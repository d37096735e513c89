"""The frozen 8-bit linear layer (``load_in_8bit``): LLM.int8 storage (``quant/int8.py``), dequantized for each
matmul like the 4-bit layer.

Forward ``y = x · ŵᵀ + b`` and backward ``∂x = ∂y · ŵ`` with ŵ made in the compute dtype just for the product (the
int8 bytes never change); saves and loads in bitsandbytes' ``Linear8bitLt`` layout: ``weight`` (int8), ``SCB``,
``weight_format``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.int8 import dequantize_int8, quantize_int8
from .linear import Linear4bit, compute_dtype_for
from .row_chunks import base_matmul

__all__ = ["Linear8bit", "QUANTIZED", "STORAGE8"]

STORAGE8 = ("codes", "SCB")  # a Linear8bit's frozen byte storage


class _Matmul8bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, scb, bias, dtype):
        w = dequantize_int8(q, scb, dtype)
        y = base_matmul(x.to(dtype), w.t())
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(q, scb)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        q, scb = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = base_matmul(gy.to(ctx.dtype), dequantize_int8(q, scb, ctx.dtype)).to(ctx.x_dtype)
        if ctx.bias_needs_grad:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, None, None, gb, None


class Linear8bit(nn.Module):
    """A linear layer whose weight is frozen int8 codes with a float32 scale per output row."""

    def __init__(self, codes: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.compute_dtype = compute_dtype
        self.codes = nn.Parameter(codes.contiguous(), requires_grad=False)
        self.SCB = nn.Parameter(scb.float().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias=None, compute_dtype=None) -> Linear8bit:
        return cls(*quantize_int8(w), bias, compute_dtype)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.SCB.numel()

    @property
    def numel(self) -> int:
        return self.codes.numel()

    def _storage(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in STORAGE8}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x, self.compute_dtype)
        return _Matmul8bit.apply(x, self.codes, self.SCB, self.bias, dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_int8(self.codes, self.SCB, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        t = (lambda p: p) if keep_vars else (lambda p: p.detach())
        destination[prefix + "weight"] = t(self.codes)
        if self.bias is not None:
            destination[prefix + "bias"] = t(self.bias)
        destination[prefix + "SCB"] = t(self.SCB)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8, device="cpu")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            state_dict[prefix + "codes"] = state_dict.pop(prefix + "weight")
        state_dict.pop(prefix + "weight_format", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


QUANTIZED = (Linear4bit, Linear8bit)  # the frozen quantized layers: dequantize(dtype) gives their float weight
