"""The frozen 4-bit linear layer.

Forward:  y = x · deq(Q)ᵀ + b,  deq(Q) made in the compute dtype just for this product.
Backward: ∂L/∂x = ∂L/∂y · deq(Q), dequantizing again — the full-size weight is never kept alive between
forward and backward (that is the memory QLoRA saves), and the frozen weight never gets a gradient.
∂L/∂b = Σ ∂L/∂y over the batch dims when the bias is trainable.

deq(Q) is written into one reused scratch buffer per (thread, device, dtype): the weight is dead right after its
matmul, and a fresh full-size tensor per call costs page faults on CPU (bench/quant.py measures both).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError
from ..quant.spec import QuantSpec
from ..quant.tensor import QuantizedTensor, quantize
from .row_chunks import base_matmul

__all__ = ["Linear4bit", "compute_dtype_for", "footprint_bytes", "parameter_counts", "STORAGE"]


def compute_dtype_for(x: torch.Tensor, default: torch.dtype | None) -> torch.dtype:
    """The dtype a matmul with ``x`` runs in: autocast's if active, else the layer's, else ``x``'s."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return default or x.dtype


class _Scratch(threading.local):
    """Reusable dequantize buffers of this thread, one per (device, dtype), grown to the largest weight seen.
    (On CUDA, autograd runs backward on its own thread, which gets its own buffer.)"""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.buffers.get((device, dtype))
        # (a buffer made under torch.inference_mode cannot be written in place outside it: made again then)
        if buf is None or buf.numel() < n or (buf.is_inference() and not torch.is_inference_mode_enabled()):
            buf = self.buffers[(device, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


_scratch = _Scratch()


def _dequantized(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """deq(Q) in the scratch buffer: valid until the next call on this thread (a named range in profiles)."""
    with torch.profiler.record_function("lowbit::dequantize"):
        return q.dequantize(dtype, out=_scratch.get(q.shape, dtype, q.packed.device))


class _Matmul4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q: QuantizedTensor, bias, dtype):
        w = _dequantized(q, dtype)
        y = base_matmul(x.to(dtype), w.t())
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.q, ctx.dtype, ctx.x_dtype = q, dtype, x.dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = base_matmul(gy.to(ctx.dtype), _dequantized(ctx.q, ctx.dtype)).to(ctx.x_dtype)
        if ctx.bias_needs_grad:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).to(ctx.bias_dtype)
        return gx, None, gb, None


@dataclass(frozen=True)
class _Layout:
    """What a Linear4bit's byte storage means (everything of the ``QuantizedTensor`` that is not a tensor)."""

    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    double_quant: bool
    nested_offset: float | None
    nested_blocksize: int


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """``t``'s bytes as a frozen uint8 parameter (a view: no copy; uint8 is never cast by ``.to(dtype)``)."""
    return nn.Parameter(t.detach().contiguous().view(torch.uint8), requires_grad=False)


class Linear4bit(nn.Module):
    """A linear layer whose weight is a frozen ``QuantizedTensor``.

    The quantized weight is stored as frozen uint8 parameters — ``codes`` (packed, high nibble first),
    ``absmax`` (uint8 codes with double quantization, else float32 bytes), ``nested_absmax`` (float32 bytes) and,
    for a type with zero points, ``zeros`` (packed) —
    so that ``.to(device)``, DDP (replicates them) and FSDP2 (shards them, gathers them bit-exactly) see them,
    and no dtype cast or float canonicalisation ever touches them. The code tables are non-persistent buffers.
    ``weight`` is the ``QuantizedTensor`` view of that storage (no copies); assigning one re-registers it.
    ``compute_dtype``: the dtype the weight is dequantized to (None: follow the input / autocast).
    Saves and loads in the bitsandbytes layout (``weight``, ``weight.absmax``, …).
    """

    def __init__(self, q: QuantizedTensor, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(q.shape) != 2:
            raise LowbitError(f"Linear4bit: weight must be 2-D, got shape {tuple(q.shape)}")
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.weight = q
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_parameter("scale_log", None)  # trainable block scales (nn/block_scales.py), when set

    @property
    def weight(self) -> QuantizedTensor:
        lay = self._layout
        as_f32 = lambda t: t.view(torch.float32)
        return QuantizedTensor(
            self.codes, self.absmax if lay.double_quant else as_f32(self.absmax), lay.shape, lay.dtype, lay.blocksize,
            lay.quant_type, as_f32(self.code), as_f32(self.nested_absmax) if lay.double_quant else None,
            as_f32(self.nested_code) if lay.double_quant else None, lay.nested_offset, lay.nested_blocksize,
            self.zeros)

    @weight.setter
    def weight(self, q: QuantizedTensor) -> None:
        self.codes = _frozen(q.packed)
        self.absmax = _frozen(q.absmax if q.double_quant else q.absmax.float())
        if q.double_quant:
            self.nested_absmax = _frozen(q.nested_absmax.float())
        else:
            self.register_parameter("nested_absmax", None)
        if q.zeros is not None:
            self.zeros = _frozen(q.zeros)
        else:
            self.register_parameter("zeros", None)
        self.register_buffer("code", q.code.float().contiguous().view(torch.uint8), persistent=False)
        nested = q.nested_code.float().contiguous().view(torch.uint8) if q.double_quant else None
        self.register_buffer("nested_code", nested, persistent=False)
        self._layout = _Layout(torch.Size(q.shape), q.dtype, q.blocksize, q.quant_type, q.double_quant,
                               q.nested_offset, q.nested_blocksize)
        # the double-quantization offset as a host tensor: compiled code passes it as data, not as a constant
        # (one compiled layer serves every layer)
        self._offset = None if q.nested_offset is None else torch.tensor([q.nested_offset], dtype=torch.float32)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QuantSpec = QuantSpec(), compute_dtype=None) -> Linear4bit:
        q = quantize(linear.weight.data, spec)
        return cls(q, linear.bias.data if linear.bias is not None else None, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x, self.compute_dtype)
        if self.scale_log is not None:
            from .block_scales import scaled_matmul

            return scaled_matmul(x, self, dtype)
        if torch.compiler.is_compiling():  # one opaque operator in the compiled graph (same arithmetic)
            from .matmul4bit_op import matmul_4bit

            y = matmul_4bit(x, self, dtype)
            return y if self.bias is None else y + self.bias.to(dtype)
        return _Matmul4bit.apply(x, self.weight, self.bias, dtype)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight the layer computes with (trained block scales applied, when it has them)."""
        w = self.weight.dequantize(dtype)
        if self.scale_log is not None:
            from .block_scales import scale_blocks_

            scale_blocks_(w, self.scale_log.detach().float().exp(), self.weight.blocksize)
        return w

    def extra_repr(self) -> str:
        lay = self._layout
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={lay.quant_type}, blocksize={lay.blocksize}, double_quant={lay.double_quant}")

    def _storage(self) -> dict[str, torch.Tensor]:
        return {k: v for k in STORAGE if (v := self._parameters.get(k)) is not None}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination.update(self.weight.state_dict(prefix + "weight"))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkeys = [k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")]
        if wkeys:
            sub = {k: state_dict.pop(k) for k in wkeys}
            q = QuantizedTensor.from_state_dict(sub, prefix + "weight")
            if tuple(q.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"{prefix}weight: shape {tuple(q.shape)} does not match the layer's "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self.weight = q
        elif strict:
            missing_keys.append(prefix + "weight")
        # the byte storage is set above (its shapes follow the data type); the base class then loads the bias
        state_dict.update({prefix + k: v for k, v in self._storage().items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


# a Linear4bit's frozen byte storage (parameters) — what footprint and parameter counts treat as the 4-bit weight
STORAGE = ("codes", "absmax", "nested_absmax", "zeros")


def _quantized(net: nn.Module) -> list[nn.Module]:
    """The frozen quantized layers (4-bit, and 8-bit: ``nn/linear8bit.py``) — each has ``_storage()``."""
    return [m for m in net.modules() if hasattr(m, "_storage") and hasattr(m, "dequantize")]


def _quantized_storage_ids(net: nn.Module) -> set[int]:
    return {id(t) for m in _quantized(net)
            for t in (*m._storage().values(), getattr(m, "code", None), getattr(m, "nested_code", None))
            if t is not None}


def _weight_bytes_and_numel(m: nn.Module) -> tuple[int, int]:
    return (m.weight.nbytes, m.weight.numel) if isinstance(m, Linear4bit) else (m.nbytes, m.numel)


def footprint_bytes(net: nn.Module) -> int:
    """Bytes of weights a model holds: 4-bit layers by their packed size + constants (``QuantizedTensor.nbytes``:
    shared code tables not charged), 8-bit ones by codes + scales, the rest as stored; tied tensors once."""
    seen, total = _quantized_storage_ids(net), 0
    for p in list(net.parameters()) + list(net.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total + sum(_weight_bytes_and_numel(m)[0] for m in _quantized(net))


def parameter_counts(net: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters — a quantized weight counts by its number of elements, not its storage bytes."""
    skip = _quantized_storage_ids(net)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters() if id(p) not in skip)
    return trainable, total + sum(_weight_bytes_and_numel(m)[1] for m in _quantized(net))
