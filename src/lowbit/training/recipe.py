"""``train(cfg)``: a config → its parts (data, 4-bit model with LoRA, optimizer, schedule, callbacks) → the loop.

    output_dir/  adapter_config.json, adapter_model.safetensors   the result (PEFT format)
                 config.yaml, metrics.jsonl, loss.png, checkpoints/step-…/
                 base/   with quant_calibration: the calibrated 4-bit base the adapter belongs to

``resume`` continues from the newest checkpoint; its saved config is compared with this one first: a change
that alters the math (model, quantization, LoRA shape, data, sequence length, batch, optimizer, …) is refused,
naming the keys; harmless ones (logging and checkpoint cadence, max_steps) are reported and taken.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path

import torch

from .. import optim
from ..atomic import writing_file
from ..data.batching import Batches
from ..data.packing import PackedBatches
from ..data.sources import parse_sources
from ..data.table import source_tables
from ..dtypes import to_torch
from ..errors import LowbitError
from ..io.adapters import save_adapter
from ..io.loader import SourceWeights, load
from ..io.tokenizer import load_tokenizer
from ..nn.lora import add_lora, count_parameters, lora_state_dict
from ..runlock import LOCK_NAME, RunLock
from .calibrated_base import BASE_DIR, calibrated_base
from .callbacks import Evaluator, MetricsLog, ProgressBar, TensorBoard
from .checkpoint import Checkpointer, latest_checkpoint, load_adapter_weights, load_trainer_state, saved_meta
from .config import TrainConfig, config_changes, config_to_yaml
from .distributed import World, base_bytes, check_same_base, init_world, wrap
from .evaluation import evaluate
from .loop import NonFiniteLoss, train_loop
from .loss import module_loss
from .plot import plot_losses
from .preflight import advice, free_memory, preflight
from .schedule import lr_lambda
from .state import TrainState

__all__ = ["train", "load_data", "load_model", "total_steps"]

RUN_FILES = ("checkpoints", "metrics.jsonl", "loss.png", "adapter_model.safetensors", "adapter_config.json",
             "config.yaml", "tensorboard", BASE_DIR)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print,
          force: bool = False, callbacks=()) -> dict:
    """Fine-tune as ``cfg`` says; returns the output folder, step count, eval losses, tokens/s, model, tokenizer.
    ``callbacks``: more ``training.callbacks.Callback``s, after lowbit's own (they see each step's record).

    The output folder is locked for the run (``runlock.py``); a run that the memory plan says will not fit is
    refused before anything loads unless ``force`` (``preflight.py``). Under torchrun every rank calls this;
    rank 0 locks, logs and writes (see ``distributed.py``).
    """
    cfg.validate()
    world = init_world(cfg.distributed, cfg.ddp_timeout)
    log = log if world.main else (lambda *a: None)
    try:
        with RunLock(cfg.output_dir) if world.main else contextlib.nullcontext():
            ck = _prepare_output_dir(Path(cfg.output_dir), cfg, world, resume, overwrite, log)
            note = None if force else preflight(cfg, world.size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            if note:
                log(note)
            return _train(cfg, world, ck, progress, log, list(callbacks))
    finally:
        world.close()


def _train(cfg: TrainConfig, world: World, ck: Path | None, progress: bool, log, extra: list) -> dict:
    out = Path(cfg.output_dir)
    dtype = to_torch(cfg.compute_dtype)
    torch.manual_seed(cfg.seed)
    tok = load_tokenizer(cfg.base_model)
    batches, valid = load_data(cfg, tok, log)
    model = load_model(cfg, dtype, log, calibrated_base(cfg, out, batches.samples, tok, dtype, world, log))
    check_same_base(model, world)
    if ck is not None:
        load_adapter_weights(ck, model)
    trainer = wrap(model, world)
    if world.mode == "fsdp":
        per_rank = world.sum(base_bytes(model))[0] / world.size
        log(f"fsdp over {world.size} ranks: {per_rank / 2**20:.2f} MiB of 4-bit base per rank")
    total = total_steps(cfg, len(batches), world.size)
    cfg = per_epoch_cadence(cfg, len(batches), world.size, log)
    opt, sched = _optimizer(cfg, trainer, total)
    state = TrainState()
    if ck is not None:
        state = load_trainer_state(ck, opt, world)
        sched.last_epoch = state.step  # the optimizer's saved param groups already carry this step's lr
        log(f"resumed from {ck} at step {state.step}")
    if world.main:
        with writing_file(out / "config.yaml") as tmp:
            tmp.write_text(config_to_yaml(cfg))
        _keep_metrics_up_to(out / "metrics.jsonl", state.step)
    run = dict(dtype=dtype, loss_fn=module_loss, world=world)
    if "base_eval_loss" not in state.history and valid is not None:
        state.history["base_eval_loss"] = evaluate(trainer, valid, **run)
        log(f"eval loss before training: {state.history['base_eval_loss']:.4f}")
    checkpoints = Checkpointer(out, model, opt, cfg, total, world)
    callbacks = [*([Evaluator(trainer, valid, cfg.eval_steps, total, **run)] if valid is not None else []),
                 *(_reporters(cfg, out, total, progress, log) if world.main else []), checkpoints, *extra]
    try:
        train_loop(trainer, opt, batches, steps=total, scheduler=sched, state=state, callbacks=callbacks,
                   accumulation=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm, **run)
    except KeyboardInterrupt:
        if world.size > 1:  # the ranks were stopped at different points: no collective save now
            raise LowbitError(f"interrupted; continue with --resume from the last checkpoint, "
                              f"{latest_checkpoint(out) or 'none yet'}") from None
        saved = _save_uninterruptibly(checkpoints, state) if state.step else None
        raise LowbitError(f"interrupted at step {state.step}; checkpoint saved to {saved}. Continue with --resume") \
            from None
    except NonFiniteLoss as e:
        raise LowbitError(f"{e}; stopped. Last good checkpoint: {latest_checkpoint(out) or 'none'} "
                          "(try a lower learning_rate)") from None
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise LowbitError(f"out of memory in step {state.step + 1}: {advice(cfg, int(0.7 * free_memory()[0]))}; "
                          f"the last checkpoint, {latest_checkpoint(out) or 'none yet'}, is kept — continue with "
                          "--resume after the change") from None
    tensors = lora_state_dict(model)  # whole on every rank (gathered under FSDP); rank 0 writes
    if world.main:
        save_adapter(model, out, tensors=tensors)
        plot_losses(out, state.history.get("base_eval_loss"))
    evals = state.history["eval"]
    return {"output_dir": str(out), "steps": state.step, "base_eval_loss": state.history.get("base_eval_loss"),
            "eval_loss": evals[-1][1] if evals else None, "tokens_per_s": state.tokens_per_s(), "model": model,
            "tokenizer": tok, "rank": world.rank, "world_size": world.size}


def _optimizer(cfg: TrainConfig, trainer, total: int):
    """The optimizer over the trainable (LoRA) parameters and its learning-rate schedule."""
    opt = optim.make(cfg.optimizer, [p for p in trainer.parameters() if p.requires_grad], lr=cfg.learning_rate,
                     weight_decay=cfg.weight_decay, budget_bytes=int(cfg.optimizer_budget_mb * 2**20))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_scheduler, cfg.warmup_steps, total))


def _reporters(cfg: TrainConfig, out: Path, total: int, progress: bool, log) -> list:
    """What rank 0 reports to: metrics.jsonl, TensorBoard (if asked), the progress bar."""
    return [MetricsLog(out / "metrics.jsonl", cfg.logging_steps),
            *([TensorBoard(out / "tensorboard", cfg.logging_steps, log)] if cfg.tensorboard else []),
            ProgressBar(total, progress)]


def per_epoch_cadence(cfg: TrainConfig, batches_per_epoch: int, world_size: int = 1, log=print) -> TrainConfig:
    """``evals_per_epoch`` / ``saves_per_epoch`` (Axolotl's keys) as ``eval_steps`` / ``save_steps``."""
    per_epoch = math.ceil(batches_per_epoch / (cfg.gradient_accumulation_steps * world_size))
    changes = {k: max(1, per_epoch // getattr(cfg, n)) for k, n in (("eval_steps", "evals_per_epoch"),
                                                                 ("save_steps", "saves_per_epoch")) if getattr(cfg, n)}
    if changes:
        log(", ".join(f"{k} = {v}" for k, v in changes.items()) + f" (an epoch is {per_epoch} steps)")
    return dataclasses.replace(cfg, **changes)


def total_steps(cfg: TrainConfig, batches_per_epoch: int, world_size: int = 1) -> int:
    """``max_steps``, else enough optimizer steps for ``num_epochs`` passes (a step takes
    ``gradient_accumulation_steps`` micro-batches on each of ``world_size`` ranks)."""
    per_step = cfg.gradient_accumulation_steps * world_size
    return cfg.max_steps or max(1, math.ceil(math.ceil(batches_per_epoch / per_step) * cfg.num_epochs))


def load_data(cfg: TrainConfig, tok, log=print) -> tuple[Batches | PackedBatches, Batches | None]:
    """Train and held-out batches: every source in ``datasets`` read and tokenized by its own format (cached),
    mixed; with ``sample_packing`` the training samples share rows (held-out ones are evaluated one per row)."""
    data = source_tables(parse_sources(cfg.datasets, cfg.dataset_format), tok, cfg.val_set_size, cfg.seed,
                         cfg.sequence_len, cfg.train_on_inputs, cfg.dataset_processes)
    train, valid = data.train, data.valid
    pad = tok.pad_token_id
    batches = PackedBatches(train, cfg.micro_batch_size, pad, cfg.sequence_len, cfg.seed) if cfg.sample_packing \
        else Batches(train, cfg.micro_batch_size, pad, cfg.seed, cfg.group_by_length,
                     cfg.sequence_len if cfg.pad_to_sequence_len else None)
    packed = f"; packed into {len(batches.rows)} rows of {cfg.sequence_len} " \
             f"({100 * train.real_tokens() / (len(batches.rows) * cfg.sequence_len):.0f}% full)" \
        if cfg.sample_packing else ""
    fmts = ", ".join(dict.fromkeys(data.formats))
    log(f"data: {len(train)} train / {len(valid) if valid else 0} valid samples ({fmts}); {data.truncated} "
        f"truncated to {cfg.sequence_len} tokens, {data.dropped} dropped (nothing to learn)"
        f"{packed}")
    return batches, Batches(valid, cfg.micro_batch_size, pad, cfg.seed) if valid else None


def load_model(cfg: TrainConfig, dtype, log=print, base: str | None = None):
    """The base (quantized while it streams in; ``base``: another folder holding it, e.g. the calibrated one)
    with LoRA adapters on the configured layers."""
    model = load(base or cfg.base_model, cfg.quant_spec(), compute_dtype=dtype,
                 trust_remote_code=cfg.trust_remote_code)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules,
                use_rslora=cfg.use_rslora, init=cfg.lora_init, verbose=False)
    if cfg.lora_init == "loftq":
        with SourceWeights(model) as source:
            add_lora(model, **lora, source_weight=source)
    else:
        add_lora(model, **lora)
    trainable, total = count_parameters(model)
    spec = cfg.quant_spec()
    log(f"model: {base or cfg.base_model} ({f'4-bit {spec}' if spec else 'unquantized'}, compute "
        f"{str(dtype).split('.')[-1]}); LoRA r={cfg.lora_r}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _prepare_output_dir(out: Path, cfg: TrainConfig, world: World, resume: bool, overwrite: bool,
                        log) -> Path | None:
    """The checkpoint to resume from (None for a fresh run), after checking the folder allows this run. Every
    rank checks (and agrees); rank 0 alone deletes what --overwrite replaces, and what a killed run left."""
    if world.main:
        _remove_stale_temporaries(out)
    if resume:
        ck = latest_checkpoint(out)
        if ck is None:
            raise LowbitError(f"{out}: --resume, but there is no checkpoint in {out / 'checkpoints'}")
        meta = saved_meta(ck)
        was = (meta.get("world_size", 1), meta.get("distributed", "none"))
        if was != (world.size, world.mode):
            raise LowbitError(f"{ck}: written by {was[0]} process(es) ({was[1]}); resume it with the same "
                              f"number and mode, not {world.size} ({world.mode})")
        math_changes, harmless = config_changes(meta.get("config") or {}, cfg)
        if math_changes:
            raise LowbitError(f"{out}: cannot resume: the config differs from the checkpoint's in what the training "
                              f"computes ({'; '.join(math_changes)}); use the same settings, or --overwrite")
        if harmless:
            log(f"resuming with changed settings: {'; '.join(harmless)}")
        return ck
    if not out.exists() or not any(p.name != LOCK_NAME for p in out.iterdir()):
        return None
    if overwrite:
        if world.main:
            for name in RUN_FILES:
                p = out / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        world.barrier()
        return None
    saved = out / "config.yaml"
    what = "a different run" if saved.exists() and saved.read_text() != config_to_yaml(cfg) else "a run"
    raise LowbitError(f"{out}: output_dir already holds {what}; use --resume to continue it or --overwrite to "
                      "replace it")


def _keep_metrics_up_to(path: Path, step: int) -> None:
    """metrics.jsonl of a resumed run ends at its checkpoint's step (a killed run may have logged steps past its
    last checkpoint, which the resumed run computes again); a fresh run starts it empty."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines() if step else ():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (ValueError, AttributeError):  # a line cut short by a kill
            continue
    with writing_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


def _remove_stale_temporaries(out: Path) -> None:
    """Temporaries a killed run left behind (``.step-….tmp-…``, ``.….old-…``): this run holds the lock, so no
    writer can be using them."""
    for folder in (out, out / "checkpoints"):
        for p in folder.glob(".*") if folder.is_dir() else ():
            if ".tmp-" in p.name or ".old-" in p.name:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _save_uninterruptibly(checkpoints: Checkpointer, state: TrainState) -> Path:
    """Write the checkpoint with Ctrl-C ignored: a second Ctrl-C must not tear it."""
    prev = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return checkpoints.save(state)
    finally:
        signal.signal(signal.SIGINT, prev)
