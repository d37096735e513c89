"""Quantize-on-load: a causal LM from a Hugging Face folder (or GGUF, or a built-in name), its linear layers
turned into 4-bit ``Linear4bit`` while the checkpoint streams in.

The model definitions are transformers'. Loading builds the model skeleton with parameters on the meta
device, then reads the checkpoint one tensor at a time and turns each targeted linear weight straight into a
``Linear4bit``; nothing full-size is kept beyond one tensor. A checkpoint already in bitsandbytes' 4-bit layout
is read as it is. What the model was loaded from travels with it as one typed record, ``BaseInfo``
(``base_info(net)``): adapters remember which base they were trained on, exports which dtype it computed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..dtypes import default_compute_dtype, name_of
from ..errors import LowbitError
from ..jsonfile import read_object
from ..nn.experts import Experts
from ..nn.fused import fuse_modules
from ..nn.linear import Linear4bit
from ..nn.linear8bit import QUANTIZED, Linear8bit
from ..nn.lora import linear_module_names, output_head_names
from ..nn.vision import float_layer_names
from ..quant.spec import INT8, LOWBIT_QUANT_METHOD, QUANT_TYPES, QuantSpec
from ..quant.tensor import QuantizedTensor, check_finite, quantize
from .allocator import returning_allocator
from .calibration_record import CONFIG_KEY, CalibrationRecord, scaled_weight
from .checkpoint_names import CheckpointNames
from .moe import expert_matrix, load_experts
from .processor import is_vision_config
from .resolve import resolve_model
from .safetensors import Reader

__all__ = ["BaseInfo", "base_info", "load", "SourceWeights", "params_on_meta"]


@dataclass(frozen=True)
class BaseInfo:
    """Where a loaded model came from."""

    name: str | None = None          # what the caller passed: built-in name, folder, .gguf file
    path: str | None = None          # the local folder that was read
    fingerprint: str | None = None   # digest of the base weights (the same for fp32/bf16/4-bit copies of one model)
    compute_dtype: str = "float32"
    quant: QuantSpec | None = None   # how the linear layers are stored; None: not quantized
    transposed: frozenset = frozenset()  # layers that were GPT-2-style Conv1D (weight stored in × out)
    calibration: dict | None = None  # a calibrated checkpoint's record: method, float source (calibration_record)
    config_overrides: dict | None = None  # config.json fields the run replaced (rope_scaling, …): adapters keep them


def base_info(net: nn.Module) -> BaseInfo:
    """The model's ``BaseInfo`` (an empty one for a model lowbit did not load)."""
    return getattr(net, "lowbit_base", None) or BaseInfo()


def load(model: str | os.PathLike, quant: QuantSpec | None = QuantSpec(), *, compute_dtype: torch.dtype | None = None,
         skip_modules: list[str] | None = None, trust_remote_code: bool = False, device: str = "cpu",
         config_overrides: dict | None = None, quantize_vision: bool = False) -> nn.Module:
    """Load a causal LM, quantizing its linear layers as ``quant`` says while streaming the checkpoint.

    ``quant=None`` keeps the weights in ``compute_dtype`` (16-bit LoRA). ``skip_modules``: module names kept in
    the compute dtype (default: the output head). Embeddings and norms are never quantized. A vision-language
    model (image-text-to-text) quantizes its language model only; its vision tower and projector stay in the
    compute dtype unless ``quantize_vision`` (the vision tower's linear layers too; ``nn/vision.py``).
    ``config_overrides``: fields of config.json to replace (``model_config`` in a training config).
    ``device``: where the model lives; each weight goes there as it is read and is quantized there (a GPU runs the
    Triton kernels), so the host holds one tensor at a time.
    """
    device = torch.device(device)
    folder = resolve_model(model)
    raw, config = _read_config(folder, trust_remote_code, config_overrides)
    dtype = compute_dtype or default_compute_dtype(device)
    qc = raw.get("quantization_config") or {}
    bnb = qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("load_in_8bit"))
    prequantized = bnb or qc.get("quant_method") == LOWBIT_QUANT_METHOD
    if qc and not prequantized:
        raise LowbitError(f"{folder}: checkpoint quantized with {qc.get('quant_method')!r}; lowbit reads float, "
                          "bitsandbytes 4-/8-bit or its own NF3/NF2 checkpoints")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device):  # buffers transformers makes (rotary tables) where the model runs
        net = _skeleton(folder, raw, config, dtype, trust_remote_code)
    heads = set(skip_modules) if skip_modules is not None else output_head_names(net)
    heads |= float_layer_names(net, quantize_vision)
    digests: dict[str, bytes] = {}
    transposed: set[str] = set()
    with Reader(folder) as reader, returning_allocator() as release:
        names = CheckpointNames.for_model(net, reader)

        def make_linear(key: str, w: torch.Tensor) -> nn.Module:
            _fingerprint(digests, key, w)
            release()
            return _frozen_linear(key, w.to(device), None, quant, dtype)

        load_experts(net, reader, names, make_linear)
        if quant is not None or prequantized:
            transposed = _quantize_linears(net, reader, names, quant, dtype, heads, digests, folder, device, release)
        _materialize(net, reader, names, dtype, digests, folder, device, release)
    fuse_modules(net)  # leaner backward for RMSNorm / SwiGLU; forward unchanged
    net.eval()
    stored = next((m.weight.spec if isinstance(m, Linear4bit) else QuantSpec(INT8, double_quant=False)
                   for m in net.modules() if isinstance(m, QUANTIZED)), None)
    fingerprint = raw.get("lowbit_fingerprint") or \
        hashlib.sha256(b"".join(digests[k] for k in sorted(digests))).hexdigest()[:16]
    net.lowbit_base = BaseInfo(name=str(model), path=str(folder), fingerprint=fingerprint,
                               compute_dtype=name_of(dtype), quant=stored, transposed=frozenset(transposed),
                               calibration=raw.get(CONFIG_KEY), config_overrides=config_overrides or None)
    return net


def _read_config(folder: Path, trust_remote_code: bool, overrides: dict | None = None):
    """(config.json as read, the transformers config with ``overrides`` applied — as config.json fields, so that
    transformers reads e.g. a ``rope_scaling`` into its RoPE parameters and checks it)."""
    from transformers import AutoConfig

    raw = read_object(folder / "config.json")
    if raw.get("auto_map") and not trust_remote_code:
        arch = (raw.get("architectures") or [raw.get("model_type", "this model")])[0]
        raise LowbitError(f"{folder}: {arch} needs its own code (auto_map in config.json); "
                          "refused — pass trust_remote_code=True / --trust-remote-code if you trust it")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise LowbitError(f"{folder / 'config.json'}: unsupported model type {raw.get('model_type')!r} "
                          f"({str(e).splitlines()[0]})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise LowbitError(f"{folder}: {raw.get('model_type')} is an encoder-decoder model; lowbit fine-tunes "
                          "decoder-only causal language models")
    for k in overrides or {}:
        if not hasattr(config, k):
            raise LowbitError(f"model_config: {folder / 'config.json'} has no field {k!r}")
    if overrides:
        fields = dict(overrides)
        if "rope_scaling" in fields:
            fields["rope_parameters"] = _rope_parameters(config, fields.pop("rope_scaling"))
        try:
            config = type(config).from_dict({**config.to_dict(), **fields})
            config.validate_rope()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LowbitError(f"model_config: {', '.join(overrides)} — {str(e).splitlines()[0]}") from None
    return raw, config


def _rope_parameters(config, scaling) -> dict:
    """A ``rope_scaling`` override (transformers' names: linear, dynamic, yarn, llama3, …) as the model's RoPE
    parameters: its theta and partial rotary factor kept, yarn/llama3's original length the model's native one."""
    if not isinstance(scaling, dict):
        raise LowbitError(f"model_config: rope_scaling must be a mapping (rope_type, factor, …), got {scaling!r}")
    base = getattr(config, "rope_parameters", None) or {}
    out = {k: base[k] for k in ("rope_theta", "partial_rotary_factor") if k in base}
    out.update({("rope_type" if k == "type" else k): v for k, v in scaling.items()})
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    known = ("default", *ROPE_INIT_FUNCTIONS)
    if out.get("rope_type", "default") not in known:
        raise LowbitError(f"model_config: rope_scaling: rope_type {out.get('rope_type')!r} is not one of "
                          f"{', '.join(known)}")
    if out.get("rope_type") in ("yarn", "llama3", "longrope"):
        out.setdefault("original_max_position_embeddings", getattr(config, "max_position_embeddings", None))
    return out


@contextlib.contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device (buffers stay real, e.g. rotary tables)."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        old(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _skeleton(folder: Path, raw: dict, config, dtype, trust_remote_code: bool) -> nn.Module:
    """transformers' model for ``config`` (its image-text-to-text class for a vision-language model) with every
    parameter on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_config(raw) else AutoModelForCausalLM
    with params_on_meta():
        try:
            net = auto.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise LowbitError(f"{folder}: unsupported architecture {raw.get('architectures')} "
                              f"({str(e).splitlines()[0]})") from None
    return net


def _quantize_linears(net, reader: Reader, names: CheckpointNames, quant: QuantSpec | None, dtype, heads: set,
                      digests: dict, folder: Path, device: torch.device, release=lambda: None) -> set[str]:
    """Replace every linear layer but the heads by a ``Linear4bit``: read as stored when the checkpoint is in
    bitsandbytes' layout, else quantized from its float weight (one weight in memory at a time). GPT-2-style
    ``Conv1D`` layers (weight stored in × out) are quantized transposed, as transformers + bitsandbytes do;
    their names are returned."""
    transposed = set()
    for name in linear_module_names(net):
        mod = net.get_submodule(name)
        conv = type(mod).__name__ == "Conv1D"
        if not (isinstance(mod, nn.Linear) or conv) or name in heads:
            continue
        key = names.key(f"{name}.weight")
        scb = names.key(f"{name}.SCB")
        if any(f"{key}.quant_state.bitsandbytes__{t}" in reader for t in QUANT_TYPES):
            sd = {k: reader.get(k) for k in reader.files if k == key or k.startswith(key + ".")}
            w, q = sd[key], QuantizedTensor.from_state_dict(sd, key)
        elif scb in reader:  # bitsandbytes' 8-bit layout: int8 weight + SCB
            w, q = reader.get(key), (reader.get(key), reader.get(scb))
            if w.dtype != torch.int8 or tuple(w.shape) != (mod.out_features, mod.in_features):
                raise LowbitError(f"{key}: an 8-bit weight must be int8 of shape {(mod.out_features, mod.in_features)}"
                                  f", got {w.dtype} {tuple(w.shape)}")
        elif quant is None:
            continue  # a float weight in a partly quantized checkpoint: read as a plain parameter
        else:
            w = reader.get(key)
            out_in = tuple(mod.weight.shape[::-1]) if conv else (mod.out_features, mod.in_features)
            _check_shape(key, w.t() if conv else w, out_in)
            q = None
        _fingerprint(digests, key, w)
        bkey = names.key(f"{name}.bias")
        bias = reader.get(bkey).to(device, dtype) if mod.bias is not None and bkey in reader else None
        if q is None:
            new = _frozen_linear(key, (w.t() if conv else w).to(device), bias, quant, dtype)
        elif isinstance(q, tuple):
            new = Linear8bit(*(t.to(device) for t in q), bias, compute_dtype=dtype)
        else:
            new = Linear4bit(q.to(device), bias, compute_dtype=dtype)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
        release()
        if conv:
            transposed.add(name)
    return transposed


def _frozen_linear(key: str, w: torch.Tensor, bias, quant: QuantSpec | None, dtype) -> nn.Module:
    """A frozen layer computing x·wᵀ (+ bias): 4-bit (or 8-bit) as ``quant`` says, or an ``nn.Linear`` in
    ``dtype``."""
    if quant is None:
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return lin
    try:
        if quant.rowwise:
            check_finite(w)
            return Linear8bit.from_weight(w, bias, compute_dtype=dtype)
        return Linear4bit(quantize(w.contiguous(), quant), bias, compute_dtype=dtype)
    except LowbitError as e:
        raise LowbitError(f"{key}: {e}") from None


def _check_shape(key, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{key}: checkpoint shape {tuple(t.shape)} does not match the config's {tuple(shape)}")


def _fingerprint(digests: dict, key, t):
    """Digest of name, shape and the first 64 values (as bf16) — the same for fp32/bf16 copies of one model
    and whatever order the tensors are read in."""
    sample = t.reshape(-1)[:64]
    sample = sample.to(torch.bfloat16).view(torch.int16) if sample.is_floating_point() else sample
    digests[key] = hashlib.sha256(f"{key}{tuple(t.shape)}".encode() + sample.numpy().tobytes()).digest()


def _materialize(net: nn.Module, reader: Reader, names: CheckpointNames, dtype, digests: dict, folder: Path,
                 device: torch.device, release=lambda: None):
    """Fill every parameter still on meta from the checkpoint; tied parameters stay tied."""
    slots: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mname, mod in net.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None and p.device.type == "meta":
                slots.setdefault(id(p), []).append((mod, pname, f"{mname}.{pname}" if mname else pname))
    for places in slots.values():
        key = next((names.key(full) for _, _, full in places if names.key(full) in reader), None)
        if key is None:
            raise LowbitError(f"{folder}: checkpoint has no tensor {places[0][2]!r}")
        t = reader.get(key, dtype)
        old = places[0][0]._parameters[places[0][1]]
        _check_shape(key, t, old.shape)
        _fingerprint(digests, key, t)
        new = nn.Parameter(t.to(device), requires_grad=False)
        for mod, pname, _ in places:
            mod._parameters[pname] = new
        release()


class SourceWeights:
    """The full-precision weights of a loaded model's checkpoint, read one layer at a time (for LoftQ init,
    which needs the weight before rounding; keeping them all in memory would cost the model in float32).
    For a checkpoint lowbit calibrated, the weights it was rounded from: its float source's, with the
    calibration's scales (``calibration_record.py``).

        with SourceWeights(net) as src:
            add_lora(net, init="loftq", source_weight=src)      # src("model.layers.0.mlp.up_proj") → float32
    """

    def __init__(self, net: nn.Module):
        info = base_info(net)
        if info.path is None:
            raise LowbitError("the model was not loaded by lowbit: its full-precision weights cannot be found")
        path = info.path
        self.rows: dict[str, torch.Tensor] = {}
        self.cols: dict[str, torch.Tensor] = {}
        if info.calibration:
            rec = CalibrationRecord.read(Path(info.path), info.calibration)
            path, self.rows, self.cols = rec.source, rec.rows, rec.cols
            if not (Path(path) / "config.json").is_file():
                raise LowbitError(f"{info.path} was calibrated from {path}, which is not there any more: its float "
                                  "weights are needed (LoftQ init, calibration)")
        self._reader = Reader(Path(path))
        self.path, self._net, self._transposed = str(path), net, info.transposed
        self._names = CheckpointNames.for_model(net, self._reader)

    def __call__(self, name: str) -> torch.Tensor:
        expert = re.fullmatch(r"(.+)\.(\d+)\.(gate_up_proj|down_proj)", name)
        if expert and isinstance(self._net.get_submodule(expert[1]), Experts):
            return expert_matrix(self._reader, self._names, f"{expert[1]}.{expert[3]}", int(expert[2]))[1].float()
        key = self._names.key(f"{name}.weight")
        if key not in self._reader or f"{key}.absmax" in self._reader:
            raise LowbitError(f"{self.path}: no full-precision weight for {name} (a 4-bit checkpoint has none; "
                              "LoftQ init and calibration need a float checkpoint)")
        w = self._reader.get(key, torch.float32)
        return scaled_weight(w.t().contiguous() if name in self._transposed else w, name, self.rows, self.cols)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._reader.close()
