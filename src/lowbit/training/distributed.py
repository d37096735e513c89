"""Several processes: PyTorch's own engine, launched by ``torchrun`` (gloo on CPU, nccl on CUDA).

    torchrun --nproc-per-node N -m lowbit train config.yaml          (config key ``distributed``)

    ddp    every rank holds the whole 4-bit base; only LoRA gradients are all-reduced (DistributedDataParallel,
           ``no_sync`` on all but the last micro-batch of a step)
    fsdp   each decoder layer and the root are sharded (FSDP2 ``fully_shard``): codes, absmax and LoRA split
           along dim 0 (padded), all-gathered bit-exactly for a layer's forward and backward; ≈ 1/N of the
           base on each rank
    auto   ddp when WORLD_SIZE > 1, else a single process

Every step takes N·g micro-batches of the one seeded order and rank r gets every N-th of them, and the loss is
normalised by the all-reduced number of learned tokens: N ranks × g micro-batches compute what one process
with N·g micro-batches computes. The loss runs inside the wrapped module (``loss.LossModule``), so DDP and
FSDP see every computation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.linear8bit import QUANTIZED
from .config import DISTRIBUTED
from .loss import LossModule

__all__ = ["World", "init_world", "wrap", "check_same_base", "base_bytes"]


@dataclass
class World:
    """This process's place among the ranks (a single process: rank 0 of 1, mode ``none``)."""

    rank: int = 0
    size: int = 1
    mode: str = "none"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # collectives' tensors (GPU: nccl)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        """The sum of each value over all ranks (float64)."""
        if self.size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()

    def gather(self, obj) -> list | None:
        """Every rank's ``obj`` on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def close(self) -> None:
        if self.size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_world(mode: str = "auto", timeout_s: float = 1800, log=print, cuda: bool = False) -> World:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR, … in the environment): nccl over the
    rank's LOCAL_RANK GPU when ``cuda``, else gloo. ddp or fsdp in a single process is that process's run (as FSDP
    on one GPU is), said once."""
    if mode not in DISTRIBUTED:
        raise LowbitError(f"distributed must be one of {', '.join(DISTRIBUTED)}, got {mode!r}")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        if mode in ("ddp", "fsdp"):
            log(f"distributed: {mode} in one process: nothing to share or shard, training as one process "
                "(torchrun --nproc-per-node N -m lowbit train … runs N)")
        return World()
    if mode == "none":
        raise LowbitError(f"distributed: none, but WORLD_SIZE={size}: every process would train the same run into "
                          "one output_dir; use distributed: ddp or fsdp (or auto)")
    mode = "ddp" if mode == "auto" else mode
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), mode, device)


def check_same_base(model: nn.Module, world: World) -> None:
    """All ranks must hold the same base: compare a digest of every 4-bit layer's codes across ranks."""
    if world.size == 1:
        return
    h = hashlib.sha256()
    for name, mod in model.named_modules():
        if isinstance(mod, QUANTIZED):
            h.update(name.encode() + mod.codes.detach().cpu().view(torch.uint8).numpy().tobytes())
    digests = world.gather(h.hexdigest()[:16])
    ok = torch.tensor([1 if not world.main or len(set(digests)) == 1 else 0], device=world.device)
    torch.distributed.broadcast(ok, src=0)
    if not ok.item():
        raise LowbitError(f"the ranks loaded different base models (code digests per rank: {digests}); every "
                          "rank must read the same checkpoint")


def base_bytes(model: nn.Module) -> int:
    """Bytes of quantized storage (codes and their scales) this rank holds: its shards under FSDP."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    return sum(local(t).numel() * local(t).element_size() for m in model.modules() if isinstance(m, QUANTIZED)
               for t in m._storage().values())


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise LowbitError(f"distributed: fsdp: cannot find the decoder layers of {type(model).__name__} "
                          "(transformers' _no_split_modules names none); use distributed: ddp")
    return layers


def wrap(model: nn.Module, world: World, module: LossModule | None = None) -> nn.Module:
    """The module the loop trains: ``module`` (default ``LossModule(model)``), under DDP or FSDP2 when there are
    several ranks."""
    module = module if module is not None else LossModule(model)
    if world.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module)
    if world.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        layers = _decoder_layers(model)  # every tensor is split over all ranks (padded): no limit on their number
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world.size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(module, mesh=mesh)
    return module
