"""The frozen 4-bit linear layer.

Forward:  y = x · deq(Q)ᵀ + b,  deq(Q) made in the compute dtype just for this product.
Backward: ∂L/∂x = ∂L/∂y · deq(Q), dequantizing again — the full-size weight is never kept alive between
forward and backward (that is the memory QLoRA saves), and the frozen weight never gets a gradient.
∂L/∂b = Σ ∂L/∂y over the batch dims when the bias is trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LowbitError
from ..quant.spec import QuantSpec
from ..quant.tensor import QuantizedTensor, quantize

__all__ = ["Linear4bit", "compute_dtype_for", "footprint_bytes"]


def compute_dtype_for(x: torch.Tensor, default: torch.dtype | None) -> torch.dtype:
    """The dtype a matmul with ``x`` runs in: autocast's if active, else the layer's, else ``x``'s."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return default or x.dtype


class _Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q: QuantizedTensor, bias, dtype):
        w = q.dequantize(dtype)
        y = x.to(dtype) @ w.t()
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x.dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy.to(ctx.dtype) @ ctx.q.dequantize(ctx.dtype)).to(ctx.x_dtype)
        if ctx.bias_needs_grad:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, None, gb, None


class Linear4bit(nn.Module):
    """A linear layer whose weight is a frozen ``QuantizedTensor``.

    ``compute_dtype``: the dtype the weight is dequantized to (None: follow the input / autocast).
    Saves and loads in the bitsandbytes layout (``weight``, ``weight.absmax``, …).
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise LowbitError(f"Linear4bit: weight must be 2-D, got shape {tuple(q.shape)}")
        self.weight = q
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec = QuantSpec(), compute_dtype=None) -> Linear4bit:
        q = quantize(linear.weight.data, spec)
        return cls(q, linear.bias.data if linear.bias is not None else None, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x, self.compute_dtype)
        return _Matmul4bit.apply(x, self.weight, self.bias, dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight.dequantize(dtype)

    def extra_repr(self) -> str:
        q = self.weight
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={q.quant_type}, blocksize={q.blocksize}, double_quant={q.double_quant}")

    def _apply(self, fn, recurse=True):
        # .to(device) moves the packed codes; dtype casts (model.half()) leave them untouched.
        probe = fn(torch.zeros(0))
        if probe.device != self.weight.packed.device:
            self.weight = self.weight.to(probe.device)
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.weight.state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkeys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if wkeys:
            sub = {k: state_dict.pop(k) for k in wkeys}
            q = QuantizedTensor.from_state_dict(sub, prefix + "weight")
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: shape {tuple(q.shape)} does not match the layer's "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self.weight = q
        elif strict:
            missing_keys.append(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def footprint_bytes(net: nn.Module) -> int:
    """Bytes of weights a model holds: 4-bit layers by their packed size + constants, the rest as stored."""
    seen, total = set(), 0
    for p in list(net.parameters()) + list(net.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    total += sum(m.weight.nbytes for m in net.modules() if isinstance(m, Linear4bit))
    return total
