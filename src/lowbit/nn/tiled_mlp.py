"""Tiled MLP (Snowflake's ALST, arXiv 2506.13996): the feed-forward block runs over shards of the sequence.

An MLP acts on each token alone, so splitting the tokens changes nothing but memory:

    mlp(x) = cat(mlp(x₁), …, mlp(xₙ))        x = [x₁ | … | xₙ] along the sequence

With gradients, each shard runs under a non-reentrant checkpoint: forward keeps only the shard's input (a view of
``x``), backward recomputes the shard's intermediates and frees them before the next shard. The intermediates
(gate, up, act·up: ≥ 3 × intermediate_size per token, plus LoRA's) exist for one shard at a time instead of the
whole sequence. Shard size from a memory target (``mlp_shards.py``): a shard's intermediates ≈ one hidden-size
activation of the whole sequence. Dropout inside the MLP stays correct (the checkpoint replays the RNG), but
draws its masks shard by shard.

The block's ``forward`` is replaced on the instance, so parameter names, state dicts and adapters are unchanged.
Mixture-of-experts blocks are left whole (their router statistics are per batch).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mlp_shards import shard_count

__all__ = ["tile_mlps", "mlp_blocks"]

_NAMES = ("mlp", "feed_forward")


def mlp_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The dense feed-forward blocks of the decoder layers: modules named ``mlp`` / ``feed_forward`` without
    experts inside."""
    return [(name, mod) for name, mod in model.named_modules()
            if name.rsplit(".", 1)[-1] in _NAMES and not any(n.rsplit(".", 1)[-1] == "experts"
                                                             for n, _ in mod.named_modules())]


@torch.compiler.disable  # its shards are checkpointed one by one: eager, also inside a compiled layer
def _tiled(forward, hidden: int, intermediate: int, num_shards: int | None, x, *args, **kwargs):
    if not torch.is_tensor(x) or x.dim() < 2:
        return forward(x, *args, **kwargs)
    n = shard_count(x.shape[-2], hidden, intermediate, num_shards)
    if n <= 1:
        return forward(x, *args, **kwargs)
    parts = x.split(math.ceil(x.shape[-2] / n), dim=-2)
    if torch.is_grad_enabled():
        outs = [checkpoint(forward, p, *args, use_reentrant=False, **kwargs) for p in parts]
    else:
        outs = [forward(p, *args, **kwargs) for p in parts]
    return torch.cat(outs, dim=-2)


def tile_mlps(model: nn.Module, num_shards: int | None = None) -> int:
    """Run every dense MLP block of ``model`` tiled; how many blocks were tiled."""
    cfg = model.config.get_text_config() if hasattr(model, "config") else None
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    inner = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    blocks = mlp_blocks(model)
    for _, mod in blocks:
        if not getattr(mod, "_lowbit_tiled", False):
            mod.forward = functools.partial(_tiled, mod.forward, hidden, inner, num_shards)
            mod._lowbit_tiled = True
    return len(blocks)
