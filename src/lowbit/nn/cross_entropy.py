"""Cross-entropy through a frozen output head, a chunk of tokens at a time: the logits never exist in full.

    loss = Σᵢ CE(hᵢ·Wᵀ, yᵢ)
    forward:  per chunk z = h·Wᵀ (compute dtype), lse = logsumexp(z) in float32, log p(yᵢ) = z[yᵢ] − lse;
              when h needs a gradient, also, while z exists, uᵢ = ∂ log p(yᵢ)/∂hᵢ = (onehot(yᵢ) − softmax(zᵢ))·W
              (softmax(z) = exp(z − lse)); keeps u (h's size, h's dtype) instead of h
    backward: ∂/∂hᵢ = gᵢ·uᵢ (each log p depends on its own row of h alone) — no second pass over the logits:
              the head's matrix product runs twice a step, not three times (z is not recomputed)

``chunked_token_logps`` gives log p per token (preference losses sum it per sequence; reference:
``log_softmax(h @ W.T).gather(y)``); ``chunked_cross_entropy`` is minus its sum (reference:
``F.cross_entropy(h @ W.T, y, reduction="sum")``). The tests compare each with its reference.

``compiled=True`` runs each chunk's float32 arithmetic (the cast, logsumexp and pick; exp and the one-hot subtraction)
as two ``torch.compile``d kernels, each one pass over the chunk's logits, instead of eager
PyTorch's five to six passes through float32 copies; same values (``compiled_layers.py`` decides when).
"""

from __future__ import annotations

import functools

import torch

from .loss_chunk import loss_chunk_tokens

__all__ = ["chunked_cross_entropy", "chunked_token_logps"]


def _pick(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(yᵢ), lse) of a chunk of logits, in float32."""
    z = z.float()
    lse = torch.logsumexp(z, dim=-1)
    return z.gather(1, labels[:, None])[:, 0] - lse, lse


def _grad_logits(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """∂ log p(yᵢ)/∂zᵢ = onehot(yᵢ) − exp(zᵢ − lse), in z's dtype (eager: in place on one copy)."""
    p = torch.exp_(z.float().sub_(lse[:, None]))
    p[torch.arange(p.shape[0], device=p.device), labels] -= 1
    return p.neg_().to(z.dtype)


def _grad_logits_fusable(z, lse, labels):
    """``_grad_logits`` without in-place steps, for the compiler to make one pass of."""
    hit = labels[:, None] == torch.arange(z.shape[1], device=z.device)
    return (hit.float() - torch.exp(z.float() - lse[:, None])).to(z.dtype)


@functools.cache
def _compiled_ops():
    return torch.compile(_pick), torch.compile(_grad_logits_fusable)


def _ops(compiled: bool):
    """The dispatch point: (pick, grad_logits), eager or compiled."""
    return _compiled_ops() if compiled else (_pick, _grad_logits)


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int, compiled: bool):
        w = weight.to(h.dtype)
        pick, grad_logits = _ops(compiled)
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        u = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        for i in range(0, h.shape[0], chunk):
            s = slice(i, i + chunk)
            z = h[s] @ w.t()
            out[s], lse[s] = pick(z, labels[s])
            if u is not None:
                u[s] = grad_logits(z, lse[s], labels[s]) @ w
        if u is not None:
            ctx.save_for_backward(u)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        gh = torch.empty_like(u)
        for i in range(0, u.shape[0], ctx.chunk):  # gᵢ·uᵢ in float32, a chunk at a time
            s = slice(i, i + ctx.chunk)
            gh[s] = u[s].float().mul_(g[s, None].float())
        return gh, None, None, None, None


def chunked_token_logps(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                        chunk_tokens: int | None = None, compiled: bool = False) -> torch.Tensor:
    """log-softmax(``h @ weight.T``) at ``labels``, one float32 value per row of ``h`` (``weight`` frozen)."""
    return _ChunkedTokenLogps.apply(h, weight, labels, chunk_tokens or loss_chunk_tokens(weight.shape[0]), compiled)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int | None = None, compiled: bool = False) -> torch.Tensor:
    """Summed cross-entropy of ``h @ weight.T`` against ``labels`` (rows of ``h`` are tokens; no ignored labels):
    −Σ ``chunked_token_logps``. ``weight`` must be frozen: it gets no gradient."""
    return -chunked_token_logps(h, weight, labels, chunk_tokens, compiled).sum()
