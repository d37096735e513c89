"""Compiled decoder layers: each decoder layer's forward through ``torch.compile`` (regional compilation).

Every decoder layer of a model runs the same code on same-shaped tensors, so one compiled graph serves them all
(dynamo keys its cache on the code and guards on the layer's structure, not its identity; the first layer, whose
input needs no gradient, gets a second graph). Inside a graph the compiler fuses what eager PyTorch runs one pass at
a time — RMSNorm, RoPE, SwiGLU, the residual adds, the LoRA products' casts — and derives the backward pass. The
frozen 4-bit matmul enters the graph as one opaque operator (``matmul4bit_op.py``), so the graph does not break at
each linear layer; its arithmetic is the eager layer's.

Only training forwards (gradients on, no KV cache) take the compiled path; evaluation and sampling stay eager, so
they never compile anything. A second shape compiles once more with symbolic rows and length, then every shape
reuses it. Compiled code is cached on disk (``LOWBIT_CACHE``/inductor), so a later run on the machine skips most
of the compile time. Needs a C++ compiler on the CPU (Triton on CUDA): ``compiler_missing`` says when one is
missing, and ``not_compiled_because`` which models are left eager (state-space or convolution mixers, experts).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil

import torch
from torch import nn

from ..cache import cache_root
from .decoder_layers import decoder_layers

__all__ = ["compile_layers", "compiler_missing", "not_compiled_because", "is_compiled"]

_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def compiler_missing(device_type: str) -> str | None:
    """Why ``torch.compile`` cannot build kernels for ``device_type`` here, or None when it can."""
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") else "Triton is not installed"
    if device_type != "cpu":
        return f"lowbit compiles layers on the CPU and CUDA only, not on {device_type}"
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")):
        return "no C++ compiler (g++ or clang++) was found"
    return None


def not_compiled_because(net: nn.Module) -> str | None:
    """Why ``net``'s layers are not compiled (tried and tested on attention + dense MLP layers only), or None."""
    from .experts import Experts

    layers = [m for _, m in decoder_layers(net)]
    if not layers:
        return "this model has no decoder layers lowbit knows"
    if any(isinstance(m, nn.Conv1d) for layer in layers for m in layer.modules()):  # Mamba and short-conv mixers
        return "layers with state-space or convolution mixers are not compiled yet"
    if any(isinstance(m, Experts) for layer in layers for m in layer.modules()):
        return "mixture-of-experts layers are not compiled yet"
    if any(getattr(m, "scale_log", None) is not None for layer in layers for m in layer.modules()):
        return "layers whose block scales train (train_quant_scales) are not compiled yet"
    return None


def _use_disk_cache() -> None:
    """Inductor's cache under lowbit's (its default is in /tmp, which a reboot empties), unless the user chose one
    (inductor writes its default into the variable when it first needs it)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is None or os.path.abspath(chosen) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "inductor")


def compile_layers(net: nn.Module) -> int:
    """Route ``net``'s decoder layers' training forwards through one ``torch.compile`` (their graphs shared), and
    mark its output head for the compiled chunked loss; how many layers. Callers ask ``compiler_missing`` first."""
    _use_disk_cache()
    # each kind of forward is its own graph (the first layer's input needs no gradient, packed rows, a second
    # sequence length): room for them all
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    layers = decoder_layers(net)
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    if head is not None:
        head._lowbit_compiled = True  # the chunked loss through it compiles its arithmetic too
    for _, layer in layers:
        if not is_compiled(layer):
            layer.forward = functools.partial(_forward, layer, layer.forward, _compiled(type(layer)))
            layer._lowbit_compiled = True
    return len(layers)


@functools.cache
def _compiled(cls):
    """One compiled forward per layer class: the layer's own forward, under transformers' checkpointing wrapper."""
    return torch.compile(getattr(cls.forward, "__wrapped__", cls.forward))


def is_compiled(module: nn.Module | None) -> bool:
    """Whether ``compile_layers`` marked ``module`` (a decoder layer, or the output head the loss goes through)."""
    return bool(getattr(module, "_lowbit_compiled", False))


def _forward(layer, eager, compiled, *args, **kwargs):
    """A training forward (gradients on, no cache) runs the compiled layer — checkpointed around it, as transformers'
    wrapper would, so that the recompute in backward runs the same compiled code under the same contexts; anything
    else runs the layer as it was."""
    if not torch.is_grad_enabled() or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return eager(*args, **kwargs)
    _dynamic_once_shapes_vary(compiled, args[0] if args else kwargs.get("hidden_states"))
    if layer.gradient_checkpointing and layer.training:
        return layer._gradient_checkpointing_func(functools.partial(compiled, layer, **kwargs), *args)
    return compiled(layer, *args, **kwargs)


_FIRST_SHAPE: dict = {}  # compiled forward → the shape of the hidden states it first ran on


def _dynamic_once_shapes_vary(compiled, hidden) -> None:
    """From the first hidden states whose shape differs from the first ones, rows and length both symbolic: dynamo
    would make only the dimension that changed symbolic, and compile a third time when the other one changes too
    (the short last batch of an epoch: 71 s of a float32 demo on a cold cache)."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2:
        return
    first = _FIRST_SHAPE.setdefault(compiled, tuple(hidden.shape))
    if tuple(hidden.shape) != first:
        torch._dynamo.maybe_mark_dynamic(hidden, 0)
        torch._dynamo.maybe_mark_dynamic(hidden, 1)
