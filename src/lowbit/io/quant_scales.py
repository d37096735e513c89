"""Block scales trained with the adapter (``train_quant_scales``), kept beside it in ``quant_scales.safetensors``:
one float32 tensor per 4-bit layer, named by the layer's module path, holding t of Ŵ = deq(Q) ⊙ exp(t) (one
value per block of ``blocksize`` weights; ``nn/block_scales.py``). peft and vLLM read ``adapter_model.safetensors``
only, so they load the LoRA without these; lowbit's generate, eval, merge and export apply them (merge folds
them into the dense weights exactly).

In memory the adapter's tensors carry them under ``lowbit_quant_scales.<layer>`` (``adapter_tensors``) so a
checkpoint saves and resumes them with the LoRA factors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.block_scales import block_count
from ..nn.linear import Linear4bit

__all__ = ["SCALES_FILE", "PREFIX", "scale_tensors", "split_scales", "write_scales", "read_scales", "apply_scales"]

SCALES_FILE = "quant_scales.safetensors"
PREFIX = "lowbit_quant_scales."


def scale_tensors(net: nn.Module, whole) -> dict[str, torch.Tensor]:
    """``PREFIX + layer`` → its trained log-multipliers (``whole``: a tensor as the adapter saves it); the layer
    named as the model without LoRA names it (a LoRA layer's 4-bit base sits at ``<layer>.base``)."""
    return {PREFIX + n.removesuffix(".base"): whole(m.scale_log) for n, m in net.named_modules()
            if isinstance(m, Linear4bit) and m.scale_log is not None}


def _layer(net: nn.Module, name: str) -> nn.Module | None:
    for path in (f"{name}.base", name):
        try:
            mod = net.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(mod, Linear4bit):
            return mod
    return None


def split_scales(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the adapter's other tensors, its block scales)."""
    return ({k: v for k, v in tensors.items() if not k.startswith(PREFIX)},
            {k: v for k, v in tensors.items() if k.startswith(PREFIX)})


def write_scales(scales: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k.removeprefix(PREFIX): v.contiguous() for k, v in scales.items()}, str(path), metadata=metadata)


def read_scales(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter folder's block scales under ``PREFIX`` names (none without the file)."""
    from safetensors.torch import load_file

    path = folder / SCALES_FILE
    if not path.is_file():
        return {}
    try:
        return {PREFIX + k: v for k, v in load_file(str(path)).items()}
    except Exception as e:
        raise LowbitError(f"{path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None


@torch.no_grad()
def apply_scales(net: nn.Module, scales: dict[str, torch.Tensor], path, trainable: bool = False) -> None:
    """Each named 4-bit layer of ``net`` takes its trained multipliers (a layer missing or of another size is refused
    in one line); ``trainable``: whether multipliers made here train."""
    for key, t in scales.items():
        name = key.removeprefix(PREFIX)
        mod = _layer(net, name)
        if mod is None:
            raise LowbitError(f"{path}/{SCALES_FILE}: block scales for {name!r}, which is not a 4-bit layer of this "
                              "model (load the base in the 4-bit type the adapter was trained on)")
        blocks = block_count(mod)
        if tuple(t.shape) != (blocks,):
            raise LowbitError(f"{path}/{SCALES_FILE}: {name} has {tuple(t.shape)} block scales, the layer needs "
                              f"({blocks},) (another blocksize?)")
        if mod.scale_log is None:  # (a run training them made them already: they keep requires_grad)
            mod.scale_log = nn.Parameter(torch.zeros(blocks, device=mod.codes.device), requires_grad=trainable)
        mod.scale_log.copy_(t.to(mod.scale_log.device, torch.float32))
