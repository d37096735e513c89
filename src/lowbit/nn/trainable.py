"""What trains beside LoRA: chosen rows of the embeddings and the output head, and whole full-precision modules.

    TrainableRows     W' = W with rows ``idx`` replaced by δ (float32, trained); W stays frozen. New tokens' rows
                      (and peft's ``trainable_token_indices``); a tied head shares the embedding's δ, so the tie
                      holds. Saved as peft does: ``<path>.token_adapter.trainable_tokens_delta``.
    train_modules     modules trained whole in float32 (``lora_modules_to_save``: embed_tokens, lm_head) and
                      parameters matched by regexes (``unfrozen_parameters``: norms, biases …); saved as peft's
                      ``modules_to_save`` (the module's whole weights under ``<path>.weight``). A 4-bit weight
                      cannot train (its bytes are codes): refused.

Tied embeddings stay tied: training ``embed_tokens`` trains the head too (one float32 matrix).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from .linear import STORAGE, Linear4bit
from .linear8bit import QUANTIZED, STORAGE8

__all__ = ["TrainableRows", "add_trainable_rows", "train_modules", "trained_modules", "trainable_rows"]


class TrainableRows(nn.Module):
    """A frozen ``nn.Embedding`` or ``nn.Linear`` (the output head) whose rows ``indices`` train."""

    def __init__(self, base: nn.Module, indices: list[int], delta: nn.Parameter | None = None):
        super().__init__()
        self.base = base
        self.register_buffer("indices", torch.tensor(sorted(indices), dtype=torch.long,
                                                     device=base.weight.device), persistent=False)
        self.delta = delta if delta is not None else nn.Parameter(
            base.weight.detach()[self.indices].float().clone())
        base.weight.requires_grad_(False)
        self.disabled = False  # lora.adapters_disabled(): the frozen original rows

    @property
    def weight(self) -> torch.Tensor:
        w = self.base.weight
        if self.disabled:
            return w
        return w.index_copy(0, self.indices, self.delta.to(w.dtype))

    @property
    def num_embeddings(self) -> int:
        return self.base.weight.shape[0]

    def forward(self, x):
        if isinstance(self.base, nn.Embedding):
            b = self.base
            return F.embedding(x, self.weight, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        return F.linear(x, self.weight, getattr(self.base, "bias", None))

    def extra_repr(self) -> str:
        return f"rows={self.indices.tolist()[:8]}{'…' if len(self.indices) > 8 else ''}"


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _path_of(model: nn.Module, target: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None)


def add_trainable_rows(model: nn.Module, indices: dict[str, list[int]]) -> dict[str, list[int]]:
    """Make rows of the input embeddings (key ``embed_tokens``) and the output head (``lm_head``) trainable. A head
    tied to the embeddings shares their rows' δ (so it needs no entry of its own). Returns {module path: rows}."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    done: dict[str, list[int]] = {}
    shared = None
    for key, module in (("embed_tokens", emb), ("lm_head", head)):
        rows = indices.get(key) or (indices.get("embed_tokens") if key == "lm_head" and head is not None
                                    and emb is not None and head.weight is emb.weight else None)
        if not rows or module is None:
            continue
        n = module.weight.shape[0]
        bad = [i for i in rows if not 0 <= int(i) < n]
        if bad:
            raise LowbitError(f"trainable_token_indices: {key} has {n} rows; {bad[:3]} are out of range")
        tied = key == "lm_head" and shared is not None and head.weight is shared.base.weight
        wrapped = TrainableRows(module, [int(i) for i in rows], shared.delta if tied else None)
        path = _path_of(model, module)
        _set(model, path, wrapped)
        done[path] = sorted(int(i) for i in rows)
        if key == "embed_tokens":
            shared = wrapped
    return done


def _check_not_quantized(mod: nn.Module, what: str) -> None:
    if isinstance(mod, QUANTIZED):
        raise LowbitError(f"{what} is a quantized layer: its weight is stored as codes and cannot train (train it "
                          "through LoRA, or load the base unquantized: load_in_4bit: false)")


def _unfreeze(mod: nn.Module, leaf: str) -> None:
    t = mod._parameters[leaf]
    if not t.requires_grad:
        mod._parameters[leaf] = nn.Parameter(t.detach().float(), requires_grad=True)


def train_modules(model: nn.Module, names: list[str] | None, regexes: list[str] | None,
                  missing: list | None = None) -> list[str]:
    """Unfreeze whole modules (``names``: the last part(s) of a module path, as peft matches ``modules_to_save``)
    and the parameters whose full names match ``regexes``, as float32. Returns the paths of the modules that then
    hold trained weights (saved with the adapter as peft's ``modules_to_save``). As Axolotl, a regex that matches
    nothing is fine while another one matches (it is appended to ``missing``); none matching is an error."""
    chosen: list[str] = []
    for name in names or []:
        hits = [(p, m) for p, m in model.named_modules() if (p == name or p.endswith("." + name))
                and not re.search(r"(^|\.)(lora_[AB]|base)$", p)]
        if not hits:
            raise LowbitError(f"lora_modules_to_save: no module named {name!r}")
        for p, m in hits:
            _check_not_quantized(m, f"lora_modules_to_save: {p}")
            for leaf, t in list(m._parameters.items()):
                if t is not None:
                    _unfreeze(m, leaf)
            chosen.append(p)
    unmatched = []
    for rx in regexes or []:
        try:
            pattern = re.compile(rx)
        except re.error as e:
            raise LowbitError(f"unfrozen_parameters: invalid regex {rx!r} ({e})") from None
        hits = [n for n, _ in model.named_parameters(remove_duplicate=False) if pattern.search(n) and "lora_" not in n]
        if not hits:
            unmatched.append(rx)
        for n in hits:
            owner, _, leaf = n.rpartition(".")
            mod = model.get_submodule(owner) if owner else model
            if isinstance(mod, QUANTIZED) and leaf in (*STORAGE, *STORAGE8):
                _check_not_quantized(mod, f"unfrozen_parameters: {rx!r} matches {n}, which belongs to {owner}; it")
            _unfreeze(mod, leaf)
            chosen.append(owner)
    if regexes and len(unmatched) == len(regexes):
        example = next((n for n, _ in model.named_parameters() if ".layers." in n), next(iter(dict(
            model.named_parameters()))))
        raise LowbitError(f"unfrozen_parameters: {', '.join(map(repr, unmatched))} match no parameter (names look "
                          f"like {example!r})")
    if missing is not None:
        missing.extend(unmatched)
    _retie(model)
    return sorted(set(chosen))


def _retie(model: nn.Module) -> None:
    """A tied head points at the (new, float32) embedding parameter again."""
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        if isinstance(emb, nn.Embedding) and isinstance(head, nn.Linear) and head.weight is not emb.weight:
            if head.weight.requires_grad or emb.weight.requires_grad:
                trained = emb.weight if emb.weight.requires_grad else head.weight
                emb.weight = head.weight = trained


def trained_modules(model: nn.Module) -> list[str]:
    """Paths of the modules (not LoRA's, not trainable rows, not 4-bit layers training their block scales) that
    hold trained full-precision parameters."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, (TrainableRows, Linear4bit)) or re.search(r"(^|\.)lora_[AB]$", path):
            continue
        if any(p.requires_grad for p in m._parameters.values() if p is not None):
            out.append(path)
    return out


def trainable_rows(model: nn.Module) -> dict[str, TrainableRows]:
    """{path: TrainableRows} of the model (a tied head's shared one included)."""
    return {p: m for p, m in model.named_modules() if isinstance(m, TrainableRows)}
