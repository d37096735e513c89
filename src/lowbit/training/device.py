"""The device a run computes on, and what belongs to it: its random state and its free memory.

    device: auto        the GPU when PyTorch sees one (under torchrun: the rank's LOCAL_RANK GPU), else the CPU
    device: cpu         the CPU, whatever is there
    device: cuda[:N]    that GPU; refused in one line when PyTorch sees none

Every tensor of a run lives on it: the 4-bit base is quantized there while it streams in (``io/loader.py``), LoRA,
batches (moved by the loss: ``loss.lm_loss``), the loss chunks, the optimizer's working pages and evaluation. The
data layer and checkpoints stay on the host.
"""

from __future__ import annotations

import os

import torch

from ..errors import LowbitError

__all__ = ["resolve_device", "rng_states", "set_rng_states", "free_device_memory"]


def resolve_device(setting: str = "auto", world_size: int = 1) -> torch.device:
    """The ``torch.device`` a config's ``device`` names (see the module docstring)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if setting == "cpu":
        return torch.device("cpu")
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise LowbitError(f"device: {setting}, but PyTorch sees no CUDA GPU here (torch {torch.__version__}, "
                              f"{built}); use device: cpu or auto")
        if setting == "cuda":
            return torch.device("cuda", local if world_size > 1 else torch.cuda.current_device())
        index = int(setting.split(":")[1])
        if index >= torch.cuda.device_count():
            raise LowbitError(f"device: {setting}, but there are {torch.cuda.device_count()} GPUs")
        return torch.device(setting)
    return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The random states a resume needs: the CPU generator's, and the GPU's when the run computes on one."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def free_device_memory(device: torch.device, with_ours: bool = False) -> tuple[int, str] | None:
    """(free bytes, where the number comes from) of a GPU, or None for the CPU (the pre-flight reads host RAM).
    ``with_ours``: what this process holds counts as free too (what a run that ran out of memory had to work with)."""
    if device.type != "cuda":
        return None
    if with_ours:
        torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    ours = torch.cuda.memory_reserved(device) if with_ours else 0
    return free + ours, f"free memory of {device} ({torch.cuda.get_device_name(device)})"
