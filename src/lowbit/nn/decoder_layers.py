"""The decoder layers of a transformers model: the modules transformers marks as ``GradientCheckpointingLayer``,
in order (what the heap trim hooks and block-wise reconstruction walk). In a vision-language model, its language
model's (the vision tower's blocks are marked too, and run frozen)."""

from __future__ import annotations

from torch import nn

from .vision import language_model_prefix

__all__ = ["decoder_layers"]


def decoder_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of ``net``'s decoder layers, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    lm = language_model_prefix(net)
    return [(n, m) for n, m in net.named_modules() if isinstance(m, GradientCheckpointingLayer)
            and (lm is None or n.startswith(lm + "."))]
