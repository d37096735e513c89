"""Causal self-attention with a backward pass of batched matmuls, for compiled layers on the CPU.

Forward: PyTorch's CPU flash kernel (O(L) memory, as SDPA). Backward, with the query heads of one key/value head
stacked (grouped-query attention needs no repeated K, V):

    P  = softmax(s·QKᵀ, causal)           (recomputed in float32, normalised again: the forward's ℓ is another
                                          kernel's rounding, and exp(s − ℓ) carries its error into every ∂)
    ∂V = Pᵀ·∂O        ∂P = ∂O·Vᵀ        Δ = rowsum(∂O ∘ O)
    ∂S = P ∘ (∂P − Δ)  ∂Q = s·∂S·K       ∂K = s·∂Sᵀ·Q

The float32 steps are elementwise between matmuls, so inside a compiled layer they fuse into a few passes and the
five products run at the GEMM rate: on SmolLM2's 4 × 256 batch (9 heads, 3 key/value heads) 3.1 ms a layer
against 7.7 ms for the flash kernel's backward, gradients within bfloat16 rounding of it (both against float32).
It holds B·H·L² float32 values for a moment, so it is only used while that stays under ``MAX_SCORES``; longer
sequences keep the flash backward (O(L) memory). Eager PyTorch runs the same steps slower than the flash kernel,
so only compiled layers use it (``document_attention``).
"""

from __future__ import annotations

import torch

__all__ = ["causal_attention", "suits"]

MAX_SCORES = 1 << 24  # B·H·L² scores (64 MiB in float32) at most


def suits(query: torch.Tensor, key: torch.Tensor, dropout: float) -> bool:
    """Whether ``causal_attention`` takes this call: CPU, no dropout, self-attention, B·H·L² ≤ ``MAX_SCORES``."""
    b, h, n, _ = query.shape
    return (query.device.type == "cpu" and not dropout and key.shape[2] == n and n > 1
            and h % key.shape[1] == 0 and b * h * n * n <= MAX_SCORES)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)[0]
        ctx.save_for_backward(q, k, v, out)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, out = ctx.saved_tensors
        b, h, n, d = q.shape
        kv = k.shape[1]
        rows = h // kv * n  # one key/value head's query rows, its query heads stacked
        qg, og, gg = (t.reshape(b, kv, rows, d) for t in (q, out, g.to(q.dtype)))
        pos = torch.arange(n, device=q.device)
        future = (pos[None, :] > pos[:, None]).repeat(h // kv, 1)
        s = ((qg @ k.transpose(-1, -2)).float() * ctx.scale).masked_fill(future, float("-inf"))
        p = torch.softmax(s, -1)  # its own normaliser, not the forward's ℓ: exact to float32 for these scores
        dv = p.to(v.dtype).transpose(-1, -2) @ gg
        dp = (gg @ v.transpose(-1, -2)).float()
        ds = (p * (dp - (gg.float() * og.float()).sum(-1, keepdim=True))).to(q.dtype)
        dq = (ds @ k) * ctx.scale
        dk = (ds.transpose(-1, -2) @ qg) * ctx.scale
        return dq.reshape(b, h, n, d), dk, dv, None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal SDPA of ``query`` [B, H, L, D] over ``key``/``value`` [B, Hkv, L, D] → [B, H, L, D]."""
    return _CausalAttention.apply(query, key, value, scale)
