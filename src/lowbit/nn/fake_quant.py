"""A linear layer that rounds its weight onto a k-bit grid in every forward, with trainable latent weights, block
scales and an optional LoRA start (what block-wise reconstruction trains: ``io/blockwise.py``).

    s      = s₀ · exp(t)                                   one per block of ``blocksize`` weights; t trains
    v      = clamp(W / s + z, lo, hi)                     z, [lo, hi]: the block's zero-point shift and bounds
                                                           (0 and [−1, 1] for symmetric types: quant/zero_point.py)
    Ŵ      = s · (v + sg(code[nearest(v)] − v) − z)        straight-through: ∂Ŵ/∂W = 1 inside the clamp (0
                                                           outside), ∂Ŵ/∂s = code[nearest(v)] − v inside, the
                                                           clamped value − z outside (LSQ's scale gradient)
    y      = x Ŵᵀ + b + (α/r) · (x Aᵀ) Bᵀ

``freeze()`` gives the stored form: the scales double-quantized as a checkpoint keeps them and each latent weight
rounded against its stored scale and the zero points it trained with (``quant/clipping.quantize_with_scales``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant.clipping import quantize_with_scales, start_scales
from ..quant.codebooks import codebook, quant_order
from ..quant.spec import QuantSpec
from ..quant.tensor import QuantizedTensor
from ..quant.zero_point import block_shift, has_zero_point, shifted

__all__ = ["FakeQuantLinear"]


class FakeQuantLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, spec: QuantSpec, bias: torch.Tensor | None = None,
                 lora: tuple[torch.Tensor, torch.Tensor, float] | None = None, zeros: torch.Tensor | None = None):
        super().__init__()
        if zeros is None and has_zero_point(spec.quant_type):  # those of the weight's own ranges
            zeros = start_scales(weight, spec)[1]
        self.spec, self.shape, self.zeros = spec, weight.shape, zeros
        shift = block_shift(zeros, codebook(spec.quant_type), scales.numel())
        self.register_buffer("shift", None if shift is None else shift.to(weight.device)[:, None])
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.register_buffer("s0", scales.detach().float().clamp(min=1e-12).clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.s0))
        self.bias = None if bias is None else bias.detach().float()
        midpoints, order = quant_order(spec.quant_type)
        self.register_buffer("midpoints", midpoints.to(weight.device))
        self.register_buffer("levels", codebook(spec.quant_type)[order.long()].to(weight.device))
        self.lora_A = self.lora_B = None
        if lora is not None:
            a, b, self.scaling = lora
            self.lora_A = nn.Parameter(a.detach().float().clone())
            self.lora_B = nn.Parameter(b.detach().float().clone())

    def scales(self) -> torch.Tensor:
        return self.s0 * self.log_scale.exp()

    def rounded_weight(self) -> torch.Tensor:
        """Ŵ with straight-through gradients to the latent weight and the scales."""
        n, bs = self.weight.numel(), self.spec.blocksize
        flat = torch.nn.functional.pad(self.weight.reshape(-1), (0, -n % bs)).view(-1, bs)
        s = self.scales()[:, None]
        v = shifted(flat, s, self.shift, self.spec.quant_type)
        q = self.levels[torch.bucketize(v.detach(), self.midpoints)]
        v = v + (q - v).detach()
        return ((v if self.shift is None else v - self.shift) * s).reshape(-1)[:n].view(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.rounded_weight().to(x.dtype),
                                       None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_A is not None:
            y = y + self.scaling * ((x @ self.lora_A.to(x.dtype).T) @ self.lora_B.to(x.dtype).T)
        return y

    @torch.no_grad()
    def freeze(self, dtype: torch.dtype = torch.float32) -> QuantizedTensor:
        """The stored weight: codes of the latent weight against the double-quantized scales."""
        q = quantize_with_scales(self.weight, self.scales(), self.spec, self.zeros)
        q.dtype = dtype
        return q
