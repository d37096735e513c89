"""Several LoRA adapters over one 4-bit base in memory, one of them active at a time.

Every layer any adapter targets is wrapped once in a ``LoRALinear``; each keeps a slot per adapter (its A, B and
scaling, on the base's device, in float32 as ``load_adapter`` keeps them). ``activate(name)`` points each wrapped
layer at that adapter's factors (no copy) and switches off the layers it does not target; ``activate(None)`` is the
base alone. Switching costs a pointer swap per layer, so a decode step can run one adapter's rows, then another's.

An adapter is read from the folders given on the command line, or by name from under one root (no path leaves
it). It must be LoRA only: trained embedding rows, modules trained whole or a grown vocabulary change the base
for every request, so such an adapter is refused in one line (serve its merged model instead).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from ..io.adapters import check_adapter_base, is_lora_key, lora_key_module, read_adapter
from ..io.peft_experts import from_peft
from ..io.tokenizer import end_token_ids, tokenizer_for
from ..nn.lora import LoRALinear, add_lora, linear_module_names
from ..nn.lora_options import lora_scaling

__all__ = ["Adapter", "AdapterBank", "NAME_RE", "check_name"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class Adapter:
    name: str
    path: Path
    tokenizer: object
    stop_ids: list[int]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False, default_factory=dict)


def check_name(name) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LowbitError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")


class AdapterBank:
    """The adapters served over ``net`` (its base, loaded without adapters), by name."""

    def __init__(self, net: nn.Module, base_model: str, root: str | os.PathLike | None = None, force: bool = False):
        self.net, self.base_model, self.force = net, base_model, force
        self.root = Path(root).resolve() if root else None
        self.adapters: dict[str, Adapter] = {}
        self.active: str | None = None
        self._wrapped: dict[str, LoRALinear] = {}

    def resolve(self, name: str, path: str | None = None) -> Path:
        """The folder of adapter ``name`` added at run time: ``root/path`` (``path`` defaults to ``name``),
        refused when it leaves the root or there is no root."""
        check_name(name)
        if self.root is None:
            raise LowbitError("adapters can be added at run time only from under --adapter-root")
        folder = (self.root / (path if path is not None else name)).resolve()
        if folder != self.root and self.root not in folder.parents:
            raise LowbitError(f"adapter path {path!r} is outside the adapter root")
        return folder

    def add(self, name: str, path: str | os.PathLike) -> Adapter:
        """Read the adapter in ``path`` as ``name`` (replacing one of that name)."""
        check_name(name)
        cfg, tensors, meta = read_adapter(path)
        if not self.force:
            check_adapter_base(self.net, meta, path)
        tensors = from_peft(self.net, tensors, path)
        extras = [k for k in tensors if not is_lora_key(k)]
        if extras:
            raise LowbitError(f"{path}: the adapter trains more than LoRA layers ({extras[0]}); serve its merged "
                              "model instead (lowbit merge)")
        emb = self.net.get_input_embeddings()
        vocab = int(meta.get("lowbit_vocab_size") or emb.weight.shape[0])
        if vocab != emb.weight.shape[0]:
            raise LowbitError(f"{path}: the adapter's vocabulary has {vocab} tokens, the base {emb.weight.shape[0]}; "
                              "serve its merged model instead (lowbit merge)")
        try:
            r = int(cfg.get("r", 8))
            alpha = float(cfg.get("lora_alpha", r))
        except (TypeError, ValueError) as e:
            raise LowbitError(f"{path}/adapter_config.json: bad r / lora_alpha ({e})") from None
        scaling = lora_scaling(r, alpha, bool(cfg.get("use_rslora", False)))
        pairs = {}
        for key in sorted(k for k in tensors if ".lora_A" in k):
            b = tensors.get(key.replace(".lora_A", ".lora_B"))
            if b is None:
                raise LowbitError(f"{path}: {key} has no matching lora_B")
            pairs[lora_key_module(key)] = (tensors[key], b)
        self._wrap(list(pairs), path)
        layers = {m: self._slot(m, a, b, scaling, path) for m, (a, b) in pairs.items()}
        tok = tokenizer_for(self.base_model, path)
        adapter = Adapter(name, Path(path), tok, end_token_ids(tok, path), layers)
        self.adapters[name] = adapter
        if self.active == name:
            self.activate(name, again=True)
        return adapter

    def _slot(self, module: str, a: torch.Tensor, b: torch.Tensor, scaling: float, path):
        lora = self._wrapped[module]
        device = next(lora.base.parameters()).device
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != lora.in_features or b.shape[0] != lora.out_features \
                or a.shape[0] != b.shape[1]:
            raise LowbitError(f"{path}: the LoRA factors of {module} have shapes {tuple(a.shape)} and "
                              f"{tuple(b.shape)}, which do not fit the layer ({lora.out_features}x{lora.in_features})")
        return a.to(device, torch.float32), b.to(device, torch.float32), scaling  # float32, as load_adapter keeps them

    def _wrap(self, modules: list[str], path) -> None:
        """A ``LoRALinear`` around each of ``modules`` not wrapped yet (``add_lora``, as ``load_adapter`` adds
        them), switched off until an adapter uses it."""
        new = [m for m in modules if m not in self._wrapped]
        missing = sorted(set(new) - set(linear_module_names(self.net)))
        if missing:
            raise LowbitError(f"{path}: adapter has layers the model lacks, e.g. {missing[0]!r}")
        if not new:
            return
        add_lora(self.net, r=1, alpha=1.0, target_modules=f"({'|'.join(map(re.escape, new))})", verbose=False)
        for m in new:
            self._wrapped[m] = self.net.get_submodule(m)
            self._wrapped[m].disabled = True

    def remove(self, name: str) -> None:
        if name not in self.adapters:
            raise LowbitError(f"no adapter named {name!r}")
        del self.adapters[name]
        if self.active == name:
            self.activate(None)

    def activate(self, name: str | None, again: bool = False) -> None:
        """Make adapter ``name`` (None: none) the one every wrapped layer computes."""
        if name == self.active and not again:
            return
        layers = self.adapters[name].layers if name is not None else {}
        for module, lora in self._wrapped.items():
            slot = layers.get(module)
            lora.disabled = slot is None
            if slot is not None:
                lora.lora_A.weight = nn.Parameter(slot[0], requires_grad=False)
                lora.lora_B.weight = nn.Parameter(slot[1], requires_grad=False)
                lora.scaling = slot[2]
        self.active = name
