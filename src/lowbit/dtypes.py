"""Floating-point dtypes by name: the one table the config, the command line and the planner read.

Importing this module does not import torch; only ``to_torch`` and ``default_compute_dtype`` do.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from .errors import LowbitError

__all__ = ["DTYPES", "DTYPE_ALIASES", "canonical", "to_torch", "default_compute_dtype", "default_compute_dtype_name",
           "name_of", "slow_on_cpu"]

DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}  # name → bytes per element
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical(name: str, what: str = "dtype", auto: bool = False) -> str:
    """``bf16`` → ``bfloat16`` …; ``auto`` passes through when allowed; anything else is a one-line error."""
    name = str(name)
    if auto and name == "auto":
        return name
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        choices = (["auto"] if auto else []) + [*DTYPES, *DTYPE_ALIASES]
        raise LowbitError(f"{what} must be one of {', '.join(choices)}, got {name!r}")
    return name


def to_torch(name: str, device: str = "cpu"):
    """The torch dtype for a name (``auto``: what this hardware computes fastest, see below)."""
    import torch

    name = canonical(name, auto=True)
    return default_compute_dtype(device) if name == "auto" else getattr(torch, name)


def autocast(dtype, device_type: str = "cpu"):
    """Mixed precision for 16-bit compute dtypes; float32 (or None) runs as it is."""
    import contextlib

    import torch

    if dtype in (None, torch.float32):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def name_of(dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).rpartition(".")[2]


# the CPU flags whose instructions multiply each 16-bit type in hardware (oneDNN's kernels for torch's matmuls)
_CPU_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_has(name: str) -> bool:
    return re.search(rf"\b({'|'.join(_CPU_FLAGS[name])})\b", _cpu_flags()) is not None


def slow_on_cpu(dtype, device_type: str = "cpu") -> str | None:
    """One line when ``dtype`` is a 16-bit type this CPU cannot multiply in hardware (its matmuls then run in
    software: a 1,024 × 576 × 1,536 bfloat16 product took 1.5 s against 15 ms in float32 on a 2-core AVX2 machine),
    else None (and None for any other ``device_type``)."""
    name = name_of(dtype)
    if device_type != "cpu" or name not in _CPU_FLAGS or _cpu_has(name):
        return None
    return (f"compute_dtype {name}: this CPU has no {name} matrix instructions ({' or '.join(_CPU_FLAGS[name])}), "
            f"so its matmuls run ~100x slower than in float32; compute_dtype auto (Axolotl: bf16: auto) picks "
            f"{default_compute_dtype_name()} here")


def default_compute_dtype(device="cpu"):
    """bfloat16 where the hardware multiplies bf16 natively (AVX-512 BF16 / AMX CPUs, Ampere+ GPUs; float16 on
    older GPUs), else float32."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has("bfloat16") else torch.float32


def default_compute_dtype_name(device: str = "cpu") -> str:
    """``default_compute_dtype`` by name, without torch (a GPU is assumed to do bf16: Ampere or newer)."""
    return "bfloat16" if device == "cuda" or _cpu_has("bfloat16") else "float32"
