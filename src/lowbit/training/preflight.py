"""Out-of-memory pre-flight: before anything is loaded, the planner's peak for this run against the memory that is
free; a run that would not fit is refused with the numbers and the cheapest change that fits.

    free memory   on a GPU: its free memory (torch.cuda.mem_get_info; each rank its own GPU); on the CPU:
                  MemAvailable of /proc/meminfo (the ranks of one machine share it);
                  the config's memory_limit (Axolotl's gpu_memory_limit) or $LOWBIT_MEMORY_LIMIT (e.g. 8GB) sets it
                  instead — to plan for a smaller machine, or to test
    changes       tried cumulatively, in this order, until the plan fits:
                      gradient_checkpointing: true
                      micro_batch_size halved, gradient_accumulation_steps doubled (the same batch per step)
                      optimizer: paged_adamw_8bit
                      gradient_checkpointing: offload (GPU) / offload_disk (CPU)
                      sequence_len halved, down to 128

``--force`` skips the check. A model the planner cannot read (an architecture it has no shape rule for) is
not checked, and the run says so.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import LowbitError
from ..planner.catalog import load_model_config
from ..planner.memory import HEADROOM, parse_size, plan_config
from .config import TrainConfig

__all__ = ["free_memory", "preflight", "cheaper"]


def free_memory(limit: str = "", device=None) -> tuple[int, str]:
    """(bytes free for this run, where the number comes from): ``limit`` (the config's ``memory_limit``), else
    $LOWBIT_MEMORY_LIMIT, else the GPU's free memory (a CUDA ``device``), else the machine's available memory."""
    if limit:
        return parse_size(limit), "memory_limit"
    cap = os.environ.get("LOWBIT_MEMORY_LIMIT")
    if cap:
        return parse_size(cap), "LOWBIT_MEMORY_LIMIT"
    if device is not None and getattr(device, "type", device) == "cuda":
        from .device import free_device_memory

        return free_device_memory(device)
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        m = None
    return (int(m.group(1)) * 1024, "available RAM") if m else (0, "unknown")


def _need(cfg: TrainConfig, world_size: int, local_ranks: int, device: str = "cpu") -> int:
    """Bytes the run needs where it runs: on the CPU the ranks of one machine share its memory; on GPUs each rank
    has its own."""
    per_rank = plan_config(cfg, device=device, world_size=world_size).total_bytes
    return per_rank * (local_ranks if device == "cpu" else 1)


def _plannable(cfg: TrainConfig) -> TrainConfig:
    """The config with a base_model the planner can read (a family name, or the local folder it resolves to)."""
    from ..io.resolve import BUILTIN_MODELS, resolve_model
    from ..planner.catalog import known_families

    if cfg.base_model in known_families():
        return cfg
    if cfg.base_model in BUILTIN_MODELS or Path(cfg.base_model).suffix.lower() == ".gguf":
        return dataclasses.replace(cfg, base_model=str(resolve_model(cfg.base_model)))
    return cfg


def cheaper(cfg: TrainConfig, device: str = "cpu") -> Iterator[tuple[TrainConfig, str]]:
    """Ever cheaper versions of ``cfg`` (cumulative), each with what was changed so far; the checkpoints offloaded
    (on a GPU to host memory, on the CPU to files) come before a shorter sequence."""
    said: dict[str, str] = {}

    def step(c: TrainConfig, key: str, text: str):
        said[key] = text
        return c, "; ".join(said.values())

    c = cfg
    if not c.gradient_checkpointing:
        c = dataclasses.replace(c, gradient_checkpointing=True)
        yield step(c, "gc", "gradient_checkpointing: true")
    while c.micro_batch_size > 1:
        c = dataclasses.replace(c, micro_batch_size=c.micro_batch_size // 2,
                                gradient_accumulation_steps=c.gradient_accumulation_steps * 2)
        yield step(c, "mb", f"micro_batch_size: {c.micro_batch_size} with gradient_accumulation_steps: "
                            f"{c.gradient_accumulation_steps}")
    if c.optimizer != "paged_adamw_8bit":
        c = dataclasses.replace(c, optimizer="paged_adamw_8bit")
        yield step(c, "opt", "optimizer: paged_adamw_8bit")
    if c.gradient_checkpointing is True:  # off the GPU into host memory; on the CPU, out of memory into files
        c = dataclasses.replace(c, gradient_checkpointing="offload" if device == "cuda" else "offload_disk")
        said.pop("gc", None)
        yield step(c, "gc", f"gradient_checkpointing: {c.gradient_checkpointing}")
    while c.sequence_len > 128:
        c = dataclasses.replace(c, sequence_len=max(128, c.sequence_len // 2))
        yield step(c, "seq", f"sequence_len: {c.sequence_len}")


def advice(cfg: TrainConfig, budget: int, world_size: int = 1, local_ranks: int = 1, device=None) -> str:
    """The cheapest change that brings the plan under ``budget`` bytes (or the cheapest changes there are)."""
    last = None
    kind = "cuda" if getattr(device, "type", device) == "cuda" else "cpu"
    for c, said in cheaper(cfg, kind):
        last = said
        if _need(c, world_size, local_ranks, kind) <= budget:
            return f"it would fit with {said}"
    return f"even with {last} it would not fit: use a smaller model or a larger machine" if last else \
        "no setting of this run is cheaper: use a smaller model or a larger machine"


def preflight(cfg: TrainConfig, world_size: int = 1, local_ranks: int = 1, device=None) -> str | None:
    """Refuse a run that will not fit (LowbitError); a note when the check could not be made. ``device``: where the
    run computes (a GPU: its free memory, the planner's GPU overheads)."""
    free, where = free_memory(cfg.memory_limit, device)
    kind = "cuda" if getattr(device, "type", device) == "cuda" else "cpu"
    if not free:
        return "memory pre-flight skipped: free memory unknown on this system"
    cfg = _plannable(cfg)
    load_model_config(cfg.base_model)  # an unreadable config.json is the user's error: say so now
    try:
        need = _need(cfg, world_size, local_ranks, kind)
    except LowbitError as e:
        return f"memory pre-flight skipped: the planner cannot size this model ({e})"
    budget = int(free * (1 - HEADROOM))
    if need <= budget:
        return None
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    raise LowbitError(f"this run needs about {gib(need)} at its peak, {where} is {gib(free)}: "
                      f"{advice(cfg, budget, world_size, local_ranks, device)} (or --force to run anyway)")
