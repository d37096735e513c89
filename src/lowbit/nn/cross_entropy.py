"""Cross-entropy through a frozen output head, a chunk of tokens at a time: the logits never exist in full.

    loss = Σᵢ CE(hᵢ·Wᵀ, yᵢ)
    forward:  per chunk z = h·Wᵀ (compute dtype), lse = logsumexp(z) in float32, log p(yᵢ) = z[yᵢ] − lse;
              keeps only lse (4 bytes a token)
    backward: per chunk recompute z, ∂ log p(yᵢ)/∂z = onehot(y) − softmax(z) = onehot(y) − exp(z − lse),
              ∂/∂h = gᵢ·(∂/∂z)·W

``chunked_token_logps`` gives log p per token (preference losses sum it per sequence; reference:
``log_softmax(h @ W.T).gather(y)``); ``chunked_cross_entropy`` is minus its sum (reference:
``F.cross_entropy(h @ W.T, y, reduction="sum")``). The tests compare each with its reference.
"""

from __future__ import annotations

import torch

from .loss_chunk import loss_chunk_tokens

__all__ = ["chunked_cross_entropy", "chunked_token_logps"]


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int):
        w = weight.to(h.dtype)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], chunk):
            z = (h[i : i + chunk] @ w.t()).float()
            lse[i : i + chunk] = torch.logsumexp(z, dim=-1)
            out[i : i + chunk] = z.gather(1, labels[i : i + chunk, None])[:, 0] - lse[i : i + chunk]
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        h, weight, labels, lse = ctx.saved_tensors
        w = weight.to(h.dtype)
        gh = torch.empty_like(h)
        for i in range(0, h.shape[0], ctx.chunk):
            z = (h[i : i + ctx.chunk] @ w.t()).float()
            p = torch.exp_(z.sub_(lse[i : i + ctx.chunk, None]))
            p[torch.arange(p.shape[0], device=p.device), labels[i : i + ctx.chunk]] -= 1
            gh[i : i + ctx.chunk] = p.mul_(-g[i : i + ctx.chunk, None].float()).to(h.dtype) @ w
        return gh, None, None, None


def chunked_token_logps(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int | None = None) -> torch.Tensor:
    """log-softmax(``h @ weight.T``) at ``labels``, one float32 value per row of ``h`` (``weight`` frozen)."""
    return _ChunkedTokenLogps.apply(h, weight, labels, chunk_tokens or loss_chunk_tokens(weight.shape[0]))


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of ``h @ weight.T`` against ``labels`` (rows of ``h`` are tokens; no ignored labels):
    −Σ ``chunked_token_logps``. ``weight`` must be frozen: it gets no gradient."""
    return -chunked_token_logps(h, weight, labels, chunk_tokens).sum()
