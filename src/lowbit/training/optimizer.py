"""The optimizer over what trains, in parameter groups, and its learning-rate schedule.

    LoRA A (and everything else that trains)   learning_rate
    LoRA B                                      learning_rate × loraplus_lr_ratio   (LoRA+, Hayou et al. 2024; if > 0)
    embedding rows / embeddings / head          embedding_lr, or learning_rate × embedding_lr_scale (when set)

AdamW with ``adam_beta1``, ``adam_beta2``, ``adam_epsilon`` and ``weight_decay`` (``optim/``); the schedule
(``schedule.py``) multiplies every group's rate alike. Groups with no parameters are left out; the order of the
parameters is the model's, so a checkpoint's optimizer state maps back onto them.

A paged optimizer's device budget is ``optimizer_budget_mb`` when set. Otherwise two pages on the CPU; on a GPU
also up to ``PAGED_FREE_SHARE`` of the device memory free when the optimizer is made (more pages in flight, fewer
round trips) — a share below the planner's headroom, so a run the pre-flight passed still fits.
"""

from __future__ import annotations

import torch

from .. import optim
from ..nn.trainable import TrainableRows
from ..optim.registry import OPTIMIZERS
from .config import TrainConfig
from .device import free_device_memory
from .loss import LossModule
from .schedule import lr_lambda, warmup_steps

__all__ = ["make_optimizer", "parameter_groups", "page_budget", "PAGED_FREE_SHARE"]

PAGED_FREE_SHARE = 0.02  # of free device memory; below planner.memory.HEADROOM (0.05)


def _embedding_like(model, name: str) -> bool:
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return isinstance(owner, TrainableRows) or any(m is not None and owner is m for m in (emb, head))


def parameter_groups(cfg: TrainConfig, model) -> list[dict]:
    """The trainable parameters of ``model`` (a DDP/FSDP wrapper's inner model is looked through) in groups."""
    inner = getattr(model, "module", model)  # DDP's wrapped module
    inner = inner.model if isinstance(inner, LossModule) else inner
    emb_lr = cfg.embedding_lr or (cfg.learning_rate * cfg.embedding_lr_scale if cfg.embedding_lr_scale else 0.0)
    groups: dict[str, dict] = {}
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.loraplus_lr_ratio and ".lora_B." in name:
            key, lr = "lora_B", cfg.learning_rate * cfg.loraplus_lr_ratio
        elif emb_lr and hasattr(inner, "get_input_embeddings") and _embedding_like(inner, name):
            key, lr = "embeddings", emb_lr
        else:
            key, lr = "default", cfg.learning_rate
        groups.setdefault(key, {"params": [], "lr": lr, "name": key})["params"].append(p)
    return list(groups.values())


def page_budget(optimizer: str, budget_mb: float, free_device_bytes: int | None) -> int:
    """The paged optimizer's device budget in bytes (0: the optimizer's default page pair); see the docstring."""
    kind = OPTIMIZERS.get(optimizer)
    if budget_mb or kind is None or not kind.paged or not free_device_bytes:
        return int(budget_mb * 2**20)
    return max(kind.default_budget_bytes(), int(free_device_bytes * PAGED_FREE_SHARE))


def make_optimizer(cfg: TrainConfig, model, total: int, device: torch.device | None = None):
    """(optimizer, LambdaLR schedule) for ``model``'s trainable parameters (computing on ``device``)."""
    free = free_device_memory(device) if device is not None else None
    opt = optim.make(cfg.optimizer, parameter_groups(cfg, model), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                     budget_bytes=page_budget(cfg.optimizer, cfg.optimizer_budget_mb, free and free[0]),
                     betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    warmup = warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total)
    schedule = lr_lambda(cfg.lr_scheduler, warmup, total, cfg.cosine_min_lr_ratio, cfg.cosine_constant_lr_ratio,
                         cfg.lr_quadratic_warmup)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)
