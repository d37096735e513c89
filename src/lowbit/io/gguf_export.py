"""GGUF export: a lowbit model (4-bit base + LoRA adapters) merged and written as one file llama.cpp runs.

    W = deq(Q) + s·B·A   (float32, one layer at a time)  →  llama.cpp's layout (gguf_arch.py)  →  the file's type

The types (``gguf_types.py``) are those the ``gguf`` package writes itself (its own quantizers; it has none for K- or
I-quants): f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0. Vectors (norms, biases) stay f32; a matrix whose rows
are not whole quant blocks is written f16; with the 4- and 5-bit types the token embeddings and the output head
are q8_0, the most sensitive matrices, as llama.cpp's own quantized files keep them.

Two passes: the tensor table (names, shapes, types; no data), then the data, each tensor computed, converted and
written before the next one — peak memory ≈ the 4-bit model + one float32 matrix and its converted copy. The file
is written aside and renamed (never half-written).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic import writing_file
from ..errors import LowbitError
from ..nn.linear8bit import QUANTIZED
from ..nn.lora import LoRALinear
from .gguf_arch import gguf_arch, transform, write_metadata
from .gguf_types import check_gguf_type
from .gguf_vocab import write_vocab

__all__ = ["export_gguf"]

SENSITIVE = ("token_embd.weight", "output.weight")


def _ggml(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name.upper())


def _sources(net: nn.Module) -> list[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]]:
    """(transformers tensor name, shape, float32 producer) of every tensor of the merged model, adapters folded
    in; tied parameters once."""
    out, layers = [], set()
    for name, mod in net.named_modules():
        if not isinstance(mod, (LoRALinear, *QUANTIZED)) or _inside(name, layers):
            continue
        layers.add(name)
        if isinstance(mod, LoRALinear):
            weight = lambda m=mod: (m.base_weight(torch.float32) + m.delta_weight()).float()
            bias = mod.base.bias
        else:
            weight, bias = (lambda m=mod: m.dequantize(torch.float32)), mod.bias
        out.append((f"{name}.weight", (mod.out_features, mod.in_features), weight))
        if bias is not None:
            out.append((f"{name}.bias", tuple(bias.shape), lambda b=bias: b.detach().float()))
    for pname, p in net.named_parameters():  # norms, embeddings, float linear layers (remove_duplicate: ties once)
        if not _inside(pname.rpartition(".")[0], layers, itself=True):
            out.append((pname, tuple(p.shape), lambda p=p: p.detach().float()))
    return out


def _inside(name: str, layers: set[str], itself: bool = False) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in layers for i in range(1, len(parts) + (1 if itself else 0)))


def _tensor_type(gguf_name: str, shape: tuple[int, ...], want: str):
    import gguf

    if len(shape) == 1:
        return _ggml("f32")
    kind = "q8_0" if want[:2] in ("q4", "q5") and gguf_name in SENSITIVE else want
    t = _ggml(kind)
    block = gguf.GGML_QUANT_SIZES[t][0]
    return t if shape[-1] % block == 0 else _ggml("f16")


def _convert(w: torch.Tensor, t) -> np.ndarray:
    import gguf

    a = w.detach().cpu().contiguous().numpy().astype(np.float32, copy=False)
    if t == gguf.GGMLQuantizationType.F32:
        return a
    if t == gguf.GGMLQuantizationType.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, t)


def export_gguf(net: nn.Module, out: str | os.PathLike, tokenizer, gguf_type: str = "f16",
                progress: bool = True) -> dict:
    """Write ``net`` (adapters merged) and ``tokenizer`` as one GGUF file. Returns a summary (path, bytes,
    architecture, pre-tokenizer, tensor types used)."""
    import gguf
    from tqdm.auto import tqdm

    check_gguf_type(gguf_type)
    if tokenizer is None:
        raise LowbitError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    config = net.config
    arch = gguf_arch(config)  # refuses before any work
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.name.upper()), config.num_hidden_layers)
    table = []
    for hf_name, shape, produce in _sources(net):
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LowbitError(f"GGUF export: tensor {hf_name} has no llama.cpp name for {arch.name}")
        table.append((hf_name, name, shape, _tensor_type(name, shape, gguf_type), produce))
    out = Path(out)
    with writing_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.name)
        writer.add_name(str(getattr(config, "_name_or_path", "") or out.stem))
        writer.add_file_type(_file_type(gguf_type))
        write_metadata(writer, config, arch)
        pre = write_vocab(writer, tokenizer, config.vocab_size)
        for _, name, shape, t, _ in table:
            if t in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dt = np.float32 if t == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, t)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=t)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for hf_name, _, _, t, produce in tqdm(table, desc="gguf", unit="tensor", disable=not progress):
                writer.write_tensor_data(_convert(transform(hf_name, produce(), config, arch), t))
        writer.close()
    used = sorted({t.name.lower() for *_, t, _ in table})
    return {"path": str(out), "bytes": out.stat().st_size, "architecture": arch.name, "pre_tokenizer": pre,
            "tensor_types": used, "tensors": len(table)}


def _file_type(gguf_type: str) -> int:
    import gguf

    return getattr(gguf.LlamaFileType, "ALL_F32" if gguf_type == "f32" else f"MOSTLY_{gguf_type.upper()}")
