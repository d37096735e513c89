"""Which reference model a preference run compares with, and its precomputed log-probs when it needs them.

    the base (adapters switched off)       the model starts from the base: fresh LoRA (B = 0), nothing else trained
    precomputed before training            precompute_ref_log_probs, or a start that is not the base — an SFT
                                           adapter (lora_model_dir), LoftQ's start, modules trained whole: the
                                           reference is the model as training starts, frozen

Trained embedding / head rows (new tokens, ``trainable_token_indices``) switch off with the adapters: their frozen
originals are kept.

Precomputed log-probs are written to ``output_dir/reference_logps.safetensors`` (train and held-out, with the data's
sizes) so ``--resume`` reads them back instead of computing them from an adapter that has moved on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..atomic import writing_file
from ..errors import LowbitError
from .config import TrainConfig
from .preference import precompute_reference
from .preference_spec import PreferenceSpec, starts_at_base

__all__ = ["reference", "REFERENCE_FILE"]

REFERENCE_FILE = "reference_logps.safetensors"


def reference(cfg: TrainConfig, spec: PreferenceSpec, model, batches, valid, ck, world, dtype, device, log) -> None:
    """Decide the reference (see the module docstring) and, when precomputed, attach its log-probs to the batches."""
    if not spec.needs_reference:
        log(f"reference: none (rl: {spec.method} compares the completions with each other)")
        return
    base = starts_at_base(cfg)
    if spec.method == "kto":
        if not base:
            raise LowbitError("rl: kto needs a reference that is the base model (its mismatched pairs change with "
                              "every batch, so they cannot be precomputed): drop lora_model_dir / lora_init / trained "
                              "modules, or use rl: dpo")
        log("reference: the 4-bit base with the adapters switched off (no second copy)")
        return
    if base and not cfg.precompute_ref_log_probs:
        log("reference: the 4-bit base with the adapters switched off (no second copy)")
        return
    path = Path(cfg.output_dir) / REFERENCE_FILE
    sizes = [len(batches.samples), len(valid.samples) if valid is not None else 0]
    if ck is not None:
        ref = _read(path, sizes)
        log(f"reference: log-probs read from {path}")
    else:
        why = "precompute_ref_log_probs" if base else "the model does not start from the base (the reference is the " \
            "start, frozen)"
        ref = {"train": precompute_reference(model, batches, dtype, device, log)}
        if valid is not None:
            ref["valid"] = precompute_reference(model, valid, dtype, device, log)
        if world.main:
            _write(path, ref)
        world.barrier()
        log(f"reference: log-probs precomputed ({why}), saved to {path}")
    batches.with_reference(ref["train"])
    if valid is not None:
        valid.with_reference(ref["valid"])


def _write(path: Path, ref: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with writing_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in ref.items()}, str(tmp))


def _read(path: Path, sizes: list[int]) -> dict:
    from safetensors.torch import load_file

    if not path.exists():
        raise LowbitError(f"{path}: missing; this run's reference log-probs were computed before its first step and "
                          "cannot be recomputed now (start over with --overwrite)")
    ref = load_file(str(path), device="cpu")
    got = [len(ref.get("train", torch.empty(0))), len(ref.get("valid", torch.empty(0)))]
    if got != sizes:
        raise LowbitError(f"{path}: reference log-probs for {got[0]} / {got[1]} samples, but the data has "
                          f"{sizes[0]} / {sizes[1]}: the data changed since the run started (start over with "
                          "--overwrite)")
    return ref
