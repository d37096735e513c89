"""LLM.int8 storage (Dettmers et al., 2022), as bitsandbytes keeps an 8-bit base: row-wise absmax int8.

    a      = w in float16                         (bitsandbytes' Int8Params converts first)
    SCB_r  = max_j |a_rj|                          (float32, one per output row)
    q_rj   = round(a_rj · 127 / SCB_r)             (int8; float32 arithmetic, round half to even)
    ŵ_rj   = q_rj · SCB_r · (1/127)                (float32: bitsandbytes' int8_vectorwise_dequant)

State dict (what transformers + bitsandbytes save for ``Linear8bitLt``): ``weight`` int8 (out, in), ``SCB`` float32
(out,), ``weight_format`` uint8 0 ("row"). bitsandbytes multiplies in int8 with float16 outlier columns
(``llm_int8_threshold``); lowbit dequantizes to the compute dtype for the matmul — its numbers differ from
bitsandbytes' there, never in the stored bytes. 8 bits + 32 per row: ≈8.0 bits/param.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError

__all__ = ["quantize_int8", "quantize_int8_torch", "dequantize_int8", "INV127"]

INV127 = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), float32 SCB (out,)) of a 2-D float weight, on its device (the Triton kernel of
    ``triton_quant.py`` for CUDA tensors, PyTorch operations elsewhere: the same bytes)."""
    if w.dim() != 2:
        raise LowbitError(f"int8 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.is_cuda:
        from .triton_quant import quantize_rows8

        return quantize_rows8(w.detach())
    return quantize_int8_torch(w)


def quantize_int8_torch(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_int8`` in PyTorch operations (the reference path)."""
    a = w.detach().to(torch.float16)
    scb = a.abs().amax(dim=1).float()
    q = torch.round(a * (127.0 / scb.unsqueeze(-1))).to(torch.int8)
    return q, scb


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """ŵ in ``dtype`` (computed in float32, as bitsandbytes does, then cast; into ``out`` when given)."""
    w = q * scb.view(-1, 1) * INV127
    if out is None:
        return w.to(dtype)
    return out.copy_(w)
