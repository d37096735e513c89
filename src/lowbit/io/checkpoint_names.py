"""Checkpoint tensor names vs the names of transformers' modules.

transformers 5 renames some tensors when it loads a checkpoint (Mixtral's ``.block_sparse_moe.`` is ``.mlp.`` in
the model) and fuses others (every expert's ``w1``/``w3``, or ``gate_proj``/``up_proj``, into one
``experts.gate_up_proj``; every ``w2``/``down_proj`` into ``experts.down_proj``). It publishes those rules
(``transformers.conversion_mapping``); lowbit reads them backwards, since it reads the checkpoint a tensor at a
time instead of converting it whole. Only renamings and per-expert fusions are understood; a model whose
checkpoint needs other conversions is refused by name. Vision-language models nest their rules per sub-model
(scoped to a prefix, some of them regular expressions): there transformers' own renaming is run forwards over
the checkpoint's names.
"""

from __future__ import annotations

import re

from ..errors import LowbitError
from ..nn.vision import is_vision_model

__all__ = ["CheckpointNames"]


class CheckpointNames:
    """``key(model_name)``: where a model tensor is in the checkpoint; ``experts(fused_name)``: for a fused expert
    parameter, the checkpoint names of its parts, with ``{e}`` for the expert's number (None: not fused there).
    ``rules``: transformers' conversion rules for the model (``for_model``); ``present``: the checkpoint's
    names (a Reader or a set)."""

    def __init__(self, rules, present, model: str = "this model"):
        from transformers.conversion_mapping import WeightConverter, WeightRenaming

        self.present = present
        self.forward: dict[str, str] = {}  # model name → checkpoint name, renamed forwards (vision-language models)
        self.renames: list[tuple[str, str, bool]] = []  # (in the model, in the checkpoint, only at the start)
        self.fused: list[tuple[str, list[str]]] = []
        for rule in rules or []:
            src, dst = rule.source_patterns, rule.target_patterns
            if isinstance(rule, WeightRenaming) and len(src) == len(dst) == 1 and _literal(src[0]) and \
                    _literal(dst[0], target=True):
                (ckpt, start), (mod, _) = _literal(src[0]), _literal(dst[0], target=True)
                self.renames.append((mod, ckpt, start))
            elif isinstance(rule, WeightConverter) and len(dst) == 1 and \
                    all(_literal(p.replace("*", "")) and p.count("*") == 1 for p in src):
                self.fused.append((dst[0], [p.lstrip("^").replace("\\.", ".").replace("*", "{e}") for p in src]))
            else:
                raise LowbitError(f"{model}: its checkpoints need a conversion lowbit does not read "
                                  f"({type(rule).__name__} {src} -> {dst})")

    @classmethod
    def for_model(cls, net, present) -> CheckpointNames:
        """The names for transformers model ``net`` (its class's rules, else its model type's)."""
        from transformers.conversion_mapping import extract_weight_conversions_for_model

        if is_vision_model(net):
            names = cls([], present)
            names.forward = _renamed_forwards(net, present)
            return names
        return cls(extract_weight_conversions_for_model(net), present, getattr(net.config, "model_type", None))

    def _renamed(self, name: str) -> str:
        for model_part, ckpt_part, at_start in self.renames:
            if at_start:
                name = ckpt_part + name[len(model_part):] if name.startswith(model_part) else name
            else:
                name = name.replace(model_part, ckpt_part)
        return name

    def key(self, name: str) -> str:
        """The checkpoint name of model tensor ``name`` (itself where the checkpoint has it)."""
        if name in self.present:
            return name
        return self.forward.get(name) or self._renamed(name)

    def experts(self, name: str) -> list[str] | None:
        """Checkpoint names (``{e}`` = expert) of the parts of fused expert parameter ``name``, in fusing order."""
        if name in self.present:
            return None  # the checkpoint stores it fused
        ckpt = self._renamed(name)
        for target, sources in self.fused:
            if ckpt.endswith(target):
                return [ckpt[: -len(target)] + s for s in sources]
        return None


def _renamed_forwards(net, present) -> dict[str, str]:
    """{model name: checkpoint name} for every checkpoint name transformers' renaming rules for ``net`` change."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping
    from transformers.core_model_loading import rename_source_key

    rules = get_model_conversion_mapping(net)
    if any(not isinstance(r, WeightRenaming) for r in rules):
        raise LowbitError(f"{net.config.model_type}: its checkpoints need a conversion lowbit does not read "
                          f"({next(type(r).__name__ for r in rules if not isinstance(r, WeightRenaming))})")
    model_names = dict.fromkeys(net.state_dict(keep_vars=True))
    out = {}
    for key in getattr(present, "files", present):
        name, _ = rename_source_key(key, rules, [], net.base_model_prefix, model_names)
        if name != key:
            out[name] = key
    return out


def _literal(pattern: str, target: bool = False) -> tuple[str, bool] | None:
    """(the literal text, anchored at the start) of a pattern that is a piece of a name — ``^`` and escaped dots
    aside, no regular-expression syntax — else None. ``target``: a replacement (dots are literal there)."""
    anchored = pattern.startswith("^") and not target
    text = (pattern[1:] if anchored else pattern).replace("\\.", ".")
    return (text, anchored) if re.fullmatch(r"[\w.]+", text) else None
