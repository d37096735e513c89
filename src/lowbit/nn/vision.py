"""The parts of a vision-language (image-text-to-text) model: its language model, its vision tower, the projector.

    language model   transformers' ``get_decoder()`` (``model.language_model``, Idefics3's ``model.text_model``)
    vision tower     ``model.visual`` (Qwen-VL, with its merger), ``model.vision_tower``, ``model.vision_model``
    projector        the rest (``multi_modal_projector``, Idefics3's ``connector``)

QLoRA on such a model quantizes and adapts the language model; the vision tower and projector stay in the compute
dtype (``quantize_vision`` quantizes the vision tower too), and ``all-linear`` means the language model's layers.
"""

from __future__ import annotations

from torch import nn

__all__ = ["is_vision_model", "language_model_prefix", "vision_tower_prefix", "float_layer_names"]

VISION_TOWERS = ("visual", "vision_tower", "vision_model")


def is_vision_model(net: nn.Module) -> bool:
    """An image-text-to-text model (its config has a vision part)."""
    return getattr(getattr(net, "config", None), "vision_config", None) is not None


def _name_of(net: nn.Module, target: nn.Module | None) -> str | None:
    return next((name for name, mod in net.named_modules() if mod is target), None) if target is not None else None


def language_model_prefix(net: nn.Module) -> str | None:
    """The module path of a vision-language model's language model (None for a text model)."""
    if not is_vision_model(net):
        return None
    get = getattr(net, "get_decoder", None)
    return _name_of(net, get() if callable(get) else None)


def vision_tower_prefix(net: nn.Module) -> str | None:
    """The module path of a vision-language model's vision tower (None for a text model)."""
    if not is_vision_model(net):
        return None
    return next((name for name, _ in net.named_modules() if name.rsplit(".", 1)[-1] in VISION_TOWERS
                 and name.count(".") <= 1), None)


def _under(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def float_layer_names(net: nn.Module, quantize_vision: bool = False) -> set[str]:
    """The layers a 4-bit load keeps in the compute dtype beyond the head: everything outside the language model of
    a vision-language model (the vision tower too unless ``quantize_vision``); none for a text model."""
    lm = language_model_prefix(net)
    if lm is None:
        return set()
    tower = vision_tower_prefix(net) if quantize_vision else None
    return {name for name, _ in net.named_modules() if name and not _under(name, lm) and not _under(name, tower)}
