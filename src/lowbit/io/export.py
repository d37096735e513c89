"""4-bit checkpoints that transformers + bitsandbytes load as they are.

The linear layers are written in bitsandbytes' state-dict layout (``weight``, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, …, see ``quant/tensor.py``) and ``config.json`` carries the
``quantization_config`` transformers reads (``quant_method: bitsandbytes``, ``load_in_4bit``, the quant type,
double quantization, compute dtype, storage uint8). Tied parameters are written once. Layers transformers +
bitsandbytes keep in 16 bits (``nn.Linear`` subclasses; experts, see ``nn/experts.py``) are written as float.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..atomic import writing_dir
from ..errors import LowbitError
from ..nn.linear import Linear4bit
from ..nn.linear8bit import QUANTIZED
from ..nn.lora import LoRALinear
from ..nn.vision import language_model_prefix, vision_tower_prefix
from ..quant.spec import INT8, LOWBIT_QUANT_METHOD, QuantSpec
from .calibration_record import CONFIG_KEY, CalibrationRecord
from .loader import base_info
from .processor import save_tokenizer_files

__all__ = ["save_quantized", "float_in_bitsandbytes"]


def float_in_bitsandbytes(net: nn.Module) -> list[str]:
    """The 4-bit layers of ``net`` that transformers + bitsandbytes would not quantize: it converts exactly
    ``nn.Linear`` and ``Conv1D`` modules, not subclasses (Falcon's ``FalconLinear``)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(net.config)
    except Exception:  # e.g. remote code: take every 4-bit layer for one transformers converts
        return []
    kinds = {n: m for n, m in skeleton.named_modules()}
    return [n for n, m in net.named_modules() if isinstance(m, QUANTIZED) and n in kinds
            and not (type(kinds[n]) is nn.Linear or isinstance(kinds[n], Conv1D))]


def _float_modules(net: nn.Module) -> list[str] | None:
    """What transformers + bitsandbytes must leave in 16 bits (``llm_int8_skip_modules``, matched as parts of module
    names): a vision-language model's vision side that lowbit kept float — the vision tower whole when none of it
    is quantized, else its float linear layers — and the head. None (transformers' default) for a text model."""
    tower, lm = vision_tower_prefix(net), language_model_prefix(net)
    if lm is None:
        return None
    floats = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and not n.startswith(lm + ".")]
    under = [n for n in floats if tower and n.startswith(tower + ".")]
    if tower and under and not any(isinstance(m, QUANTIZED) for m in net.get_submodule(tower).modules()):
        floats = [tower] + [n for n in floats if n not in under]
    return floats


def save_quantized(net: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``net`` (4-bit layers, no adapters) as a checkpoint transformers + bitsandbytes load (NF4, FP4), or,
    for the types bitsandbytes does not have (NF3, NF2, INT4), in the same layout with ``quant_method: lowbit``:
    lowbit loads it, transformers refuses it by name."""
    from safetensors.torch import save_file

    q = [m for m in net.modules() if isinstance(m, QUANTIZED)]
    if not q:
        raise LowbitError("the model has no quantized layers to save")
    if any(isinstance(m, LoRALinear) for m in net.modules()):
        raise LowbitError("the model carries LoRA adapters: save them with save_adapter, or merge first")
    specs = {m.weight.spec if isinstance(m, Linear4bit) else QuantSpec(INT8, double_quant=False) for m in q}
    spec = next(iter(specs))
    if len(specs) > 1:
        kinds = sorted(str(s) for s in specs)
        raise LowbitError(f"a checkpoint holds one 4-bit type per model; this model has {kinds}")
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    for name in float_in_bitsandbytes(net):  # layers transformers + bitsandbytes keep in 16 bits: as float weights
        layer = net.get_submodule(name)
        for k in [k for k in sd if k.startswith(f"{name}.weight.") or k in (f"{name}.SCB", f"{name}.weight_format")]:
            del sd[k]
        sd[f"{name}.weight"] = layer.dequantize(layer.compute_dtype or torch.float32).contiguous()
    ptrs = {}  # tied parameters (one storage, several names) are saved once; transformers re-ties them
    state = tuple(f"{n}.weight." for n, m in net.named_modules() if isinstance(m, QUANTIZED))
    for k in list(sd):
        t = sd[k]
        if k.startswith(state):  # a layer's quantization state: every layer has its own (a shared codebook copied)
            sd[k] = t.clone() if t.numel() and (t.data_ptr(), t.shape) in ptrs else t
            ptrs.setdefault((t.data_ptr(), t.shape), k)
            continue
        if t.numel() and (t.data_ptr(), t.shape) in ptrs:
            del sd[k]
        else:
            ptrs[(t.data_ptr(), t.shape)] = k
    info = base_info(net)
    cfg = net.config.to_dict()
    method = "bitsandbytes" if spec.info.bitsandbytes else LOWBIT_QUANT_METHOD
    four = not spec.rowwise
    cfg["quantization_config"] = {
        "quant_method": method, "load_in_4bit": four, "load_in_8bit": not four, "_load_in_4bit": four,
        "_load_in_8bit": not four, "bnb_4bit_quant_type": spec.quant_type if four else "fp4",
        "bnb_4bit_use_double_quant": spec.double_quant, "bnb_4bit_compute_dtype": info.compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": _float_modules(net), "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    cfg["lowbit_fingerprint"] = info.fingerprint
    record = getattr(net, "lowbit_calibration", None) or \
        (CalibrationRecord.read(Path(info.path), info.calibration) if info.calibration else None)
    if record is not None:
        cfg[CONFIG_KEY] = record.config_entry()
    with writing_dir(out, overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if record is not None:
            record.save(tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, tmp)
    return Path(out)
