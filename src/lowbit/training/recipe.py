"""``train(cfg)``: a config → its parts (data, 4-bit model with LoRA, optimizer, schedule, callbacks) → the loop.

    output_dir/  adapter_config.json, adapter_model.safetensors   the result (PEFT format)
                 tokenizer files, generation_config.json            the run's tokenizer and chat template
                 config.yaml, metrics.jsonl, loss.png, checkpoints/step-…/
                 base/   with quant_calibration: the calibrated 4-bit base the adapter belongs to

``resume`` continues from the newest checkpoint; its saved config is compared with this one first: a change
that alters the math (model, quantization, LoRA shape, data, sequence length, batch, optimizer, …) is refused,
naming the keys; harmless ones (logging and checkpoint cadence, max_steps) are reported and taken.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch

from ..atomic import writing_file
from ..dtypes import slow_on_cpu, to_torch
from ..errors import LowbitError
from ..io.adapters import adapter_tensors, save_adapter
from ..io.processor import save_tokenizer_files
from ..io.quant_scales import SCALES_FILE
from ..io.tokenizer import TOKENIZER_FILES, prepare_tokenizer, tokenizer_for
from ..nn.compiled_layers import is_compiled
from ..planner.memory import HEADROOM
from ..runlock import LOCK_NAME, RunLock
from .cadence import per_epoch_cadence, total_steps
from .calibrated_base import BASE_DIR, calibrated_base
from .callbacks import CompileTime, CompletionsLog, Evaluator, MetricsLog, ProgressBar, StepMetrics
from .checkpoint import Checkpointer, latest_checkpoint, load_adapter_weights, load_trainer_state, saved_meta
from .config import TrainConfig, config_changes, config_to_yaml
from .data import load_data, load_preference_data, load_prompt_data
from .device import free_device_memory, resolve_device
from .distributed import World, base_bytes, check_same_base, init_world, wrap
from .evaluation import evaluate
from .grpo import GRPOLoss, rollout_fn
from .grpo_spec import grpo_spec_from
from .loop import NonFiniteLoss, train_loop
from .loss import module_loss
from .model import load_model
from .offload import disk_note, offloading
from .optimizer import make_optimizer
from .plot import plot_losses
from .preference import PreferenceLoss
from .preference_spec import spec_from
from .preflight import advice, free_memory, preflight
from .reference import REFERENCE_FILE, reference
from .reward_funcs import RewardError, load_reward_funcs
from .state import TrainState
from .stopping import EarlyStopping, LossWatchdog
from .trackers import check_trackers, trackers_for

__all__ = ["train", "load_data", "load_model", "total_steps"]

RUN_FILES = ("checkpoints", "metrics.jsonl", "loss.png", "adapter_model.safetensors", "adapter_config.json",
             "config.yaml", "tensorboard", "wandb", BASE_DIR, *TOKENIZER_FILES, "special_tokens_map.json",
             "chat_template.jinja", "generation_config.json", "merges.txt", "added_tokens.json", REFERENCE_FILE,
             "completions.jsonl")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print,
          force: bool = False, callbacks=()) -> dict:
    """Fine-tune as ``cfg`` says; returns the output folder, step count, eval losses, tokens/s, model, tokenizer.
    ``callbacks``: more ``training.callbacks.Callback``s, after lowbit's own (they see each step's record).

    The output folder is locked for the run (``runlock.py``); a run that the memory plan says will not fit is
    refused before anything loads unless ``force`` (``preflight.py``). Under torchrun every rank calls this;
    rank 0 locks, logs and writes (see ``distributed.py``). ``auto_resume_from_checkpoints`` resumes when the
    folder holds a checkpoint.
    """
    cfg.validate()
    check_trackers(cfg)
    world = init_world(cfg.distributed, cfg.ddp_timeout, log, cuda=cfg.device != "cpu" and _cuda())
    log = log if world.main else (lambda *a: None)
    resume = resume or (cfg.auto_resume_from_checkpoints and latest_checkpoint(Path(cfg.output_dir)) is not None)
    try:
        with RunLock(cfg.output_dir) if world.main else contextlib.nullcontext():
            ck = _prepare_output_dir(Path(cfg.output_dir), cfg, world, resume, overwrite, log)
            device = resolve_device(cfg.device, world.size)
            note = None if force else preflight(cfg, world.size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                                                device)
            if note:
                log(note)
            return _train(cfg, world, ck, progress, log, list(callbacks), device)
    finally:
        world.close()


def _train(cfg: TrainConfig, world: World, ck: Path | None, progress: bool, log, extra: list,
           device: torch.device) -> dict:
    out = Path(cfg.output_dir)
    dtype = to_torch(cfg.compute_dtype, device.type)
    if note := slow_on_cpu(dtype, device.type):
        log(note)
    torch.manual_seed(cfg.seed)
    tok = tokenizer_for(cfg.tokenizer_config or cfg.base_model)
    changes = prepare_tokenizer(tok, cfg.chat_template, cfg.chat_template_jinja, cfg.special_tokens, cfg.tokens,
                                cfg.eot_tokens)
    if changes.changed:
        log(f"tokenizer: {'; '.join(changes.notes)}")
    grpo, spec, funcs, batches, valid = _objective_and_data(cfg, tok, world, log)
    model = load_model(cfg, dtype, log, calibrated_base(cfg, out, batches.samples, tok, dtype, world, log, device),
                       changes, len(tok) if changes.added else None, device)
    check_same_base(model, world)
    if ck is not None:
        load_adapter_weights(ck, model)
    module = GRPOLoss(model, grpo, tok, funcs, [tok.eos_token_id, *changes.eot_ids], world, cfg.micro_batch_size) \
        if grpo else PreferenceLoss(model, spec) if spec else None
    trainer = wrap(model, world, module)
    if spec:
        reference(cfg, spec, model, batches, valid, ck, world, dtype, device, log)
    if world.mode == "fsdp":
        per_rank = world.sum(base_bytes(model))[0] / world.size
        log(f"fsdp over {world.size} ranks: {per_rank / 2**20:.2f} MiB of 4-bit base per rank")
    per_epoch = len(batches) * (cfg.gradient_accumulation_steps * world.size if grpo else 1)  # in micro-batches
    total = total_steps(cfg, per_epoch, world.size)
    cfg = per_epoch_cadence(cfg, per_epoch, world.size, log)
    opt, sched = make_optimizer(cfg, trainer, total, device)
    state = TrainState()
    if ck is not None:
        state = load_trainer_state(ck, opt, world, device)
        sched.last_epoch = state.step  # the optimizer's saved param groups already carry this step's lr
        log(f"resumed from {ck} at step {state.step}")
    if world.main:
        with writing_file(out / "config.yaml") as tmp:
            tmp.write_text(config_to_yaml(cfg))
        for log_file in ("metrics.jsonl", "completions.jsonl"):
            _keep_metrics_up_to(out / log_file, state.step)
    run = dict(dtype=dtype, loss_fn=_loss_fn(cfg, device, log), world=world, device=device)
    if "base_eval_loss" not in state.history and valid is not None:
        state.history["base_eval_loss"] = evaluate(trainer, valid, **run)
        log(f"eval loss before training: {state.history['base_eval_loss']:.4f}"
            f"{_held_out_note(trainer.module if hasattr(trainer, 'module') else trainer, world)}")
    checkpoints = Checkpointer(out, model, opt, cfg, total, world, tok if changes.changed else None, device)
    timing = [CompileTime(log)] if any(is_compiled(m) for m in model.modules()) and world.main else []
    callbacks = [*timing, *_watchers(cfg, trainer, valid, total, run),
                 *(_reporters(cfg, out, total, progress, module) if world.main else []), checkpoints, *extra]
    _run(cfg, trainer, opt, sched, batches, total, state, callbacks, checkpoints, run,
         rollout_fn(trainer, module, world) if grpo else None)
    if state.stop_reason:
        log(state.stop_reason)
    tensors = adapter_tensors(model)  # whole on every rank (gathered under FSDP); rank 0 writes
    if world.main:
        _write_outputs(cfg, out, model, tensors, tok, changes.eot_ids, state, log)
    evals = state.history["eval"]
    return {"output_dir": str(out), "steps": state.step, "base_eval_loss": state.history.get("base_eval_loss"),
            "eval_loss": evals[-1][1] if evals else None, "tokens_per_s": state.tokens_per_s(), "model": model,
            "tokenizer": tok, "rank": world.rank, "world_size": world.size, "stop_reason": state.stop_reason}


def _write_outputs(cfg: TrainConfig, out: Path, model, tensors, tok, eot_ids, state, log) -> None:
    """The finished run's adapter, tokenizer and loss plot in ``out``."""
    save_adapter(model, out, tensors=tensors)
    if cfg.train_quant_scales:
        log(f"train_quant_scales: the trained block scales are in {out / SCALES_FILE}: lowbit generate, eval, "
            "merge and export apply them; peft and vLLM load the LoRA alone (give them lowbit merge's model)")
    save_tokenizer(tok, out, eot_ids)
    plot_losses(out, state.history.get("base_eval_loss"))


def _objective_and_data(cfg: TrainConfig, tok, world: World, log) -> tuple:
    """(GRPO spec, preference spec, reward functions — each None when the run is not of that kind —, training
    batches, held-out batches or None). A reward function that cannot be loaded fails before the model loads."""
    if cfg.rl and getattr(tok, "lowbit_processor", None) is not None:
        raise LowbitError(f"rl: {cfg.rl} is not built for vision-language models yet (their supervised fine-tuning "
                          "is); train a text model, or leave rl unset")
    grpo = grpo_spec_from(cfg) if cfg.rl == "grpo" else None
    spec = spec_from(cfg) if cfg.rl and not grpo else None
    if grpo:
        return grpo, None, load_reward_funcs(grpo.reward_funcs), *load_prompt_data(cfg, tok, world.size, log)
    return None, spec, None, *(load_preference_data if spec else load_data)(cfg, tok, log)


def _loss_fn(cfg: TrainConfig, device: torch.device, log):
    """The loss; with ``gradient_checkpointing: offload`` its forward keeps the checkpoints in host memory, with
    ``offload_disk`` in files."""
    if cfg.gradient_checkpointing == "offload_disk":
        log(disk_note())
        return offloading(module_loss, device, disk=True)
    if cfg.gradient_checkpointing != "offload":
        return module_loss
    if device.type == "cpu":
        log("gradient_checkpointing: offload — on the CPU the host is the device: the same as true")
    return offloading(module_loss, device)


def _held_out_note(module, world) -> str:
    """A preference run's held-out accuracy and margin, a GRPO run's held-out reward (evaluation metrics, taken)."""
    if isinstance(module, GRPOLoss):
        reward = module.take_metrics("eval", world).get("eval_reward")
        return f" (held-out reward {reward:.4f})" if reward is not None else ""
    if not isinstance(module, PreferenceLoss):
        return ""
    m = module.take_metrics("eval", world)
    acc, margin = m.get("eval_rewards/accuracies"), m.get("eval_rewards/margins")
    return f" (preference accuracy {acc:.3f}, mean margin {margin:.4f})" if acc is not None else ""


def _watchers(cfg: TrainConfig, trainer, valid, total: int, run: dict) -> list:
    """The callbacks every rank runs: evaluation, early stopping, the loss watchdog."""
    module = getattr(trainer, "module", trainer)  # under DDP, the loss module it wraps
    return [*([Evaluator(trainer, valid, cfg.eval_steps, total, **run)] if valid is not None else []),
            *([StepMetrics(module, run["world"])] if isinstance(module, (PreferenceLoss, GRPOLoss)) else []),
            *([EarlyStopping(cfg.early_stopping_patience)] if cfg.early_stopping_patience and valid else []),
            *([LossWatchdog(cfg.loss_watchdog_threshold, cfg.loss_watchdog_patience)]
              if cfg.loss_watchdog_threshold else [])]


def _run(cfg: TrainConfig, trainer, opt, sched, batches, total: int, state: TrainState, callbacks: list,
         checkpoints: Checkpointer, run: dict, rollout=None) -> None:
    """The loop, with what goes wrong in it turned into one line that names the checkpoint to go on from."""
    out, world, device = Path(cfg.output_dir), run["world"], run["device"]
    try:
        train_loop(trainer, opt, batches, steps=total, scheduler=sched, state=state, callbacks=callbacks,
                   accumulation=cfg.gradient_accumulation_steps, max_grad_norm=cfg.max_grad_norm, rollout=rollout,
                   **run)
    except KeyboardInterrupt:
        if world.size > 1:  # the ranks were stopped at different points: no collective save now
            raise LowbitError(f"interrupted; continue with --resume from the last checkpoint, "
                              f"{latest_checkpoint(out) or 'none yet'}") from None
        saved = _save_uninterruptibly(checkpoints, state) if state.step else None
        raise LowbitError(f"interrupted at step {state.step}; checkpoint saved to {saved}. Continue with --resume") \
            from None
    except RewardError as e:
        raise LowbitError(f"step {state.step + 1}: {e}; stopped. Last good checkpoint: "
                          f"{latest_checkpoint(out) or 'none'}") from None
    except NonFiniteLoss as e:
        raise LowbitError(f"{e}; stopped. Last good checkpoint: {latest_checkpoint(out) or 'none'} "
                          "(try a lower learning_rate)") from None
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        budget = _budget_after_oom(cfg, device)
        raise LowbitError(f"out of memory in step {state.step + 1}: {advice(cfg, budget, device=device)}; "
                          f"the last checkpoint, {latest_checkpoint(out) or 'none yet'}, is kept — continue with "
                          "--resume after the change") from None
    if state.stop_failed:
        raise LowbitError(f"{state.stop_reason}; stopped. Last good checkpoint: {latest_checkpoint(out) or 'none'}")


def _budget_after_oom(cfg: TrainConfig, device: torch.device) -> int:
    """What the run had to work with: on a GPU its free memory with what the run held; on the CPU 70 % of what is
    available now (the run's own pages are still mapped)."""
    if device.type == "cuda" and not cfg.memory_limit and not os.environ.get("LOWBIT_MEMORY_LIMIT"):
        return int((1 - HEADROOM) * free_device_memory(device, with_ours=True)[0])
    return int(0.7 * free_memory(cfg.memory_limit, device)[0])


def _cuda() -> bool:
    return torch.cuda.is_available()


def save_tokenizer(tok, out: Path, eot_ids: list[int] | None = None) -> None:
    """The run's tokenizer (vocabulary, special tokens, chat template; a vision-language model's processor files)
    beside its adapter, and a generation config
    whose end tokens include the turn-ending ones, so merge, generate and export use them."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=out, prefix=".tokenizer.tmp-") as tmp:  # each file then replaced whole
        save_tokenizer_files(tok, tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, out / f.name)
    ends = [i for i in dict.fromkeys([tok.eos_token_id, *(eot_ids or [])]) if i is not None]
    with writing_file(out / "generation_config.json") as tmp:
        tmp.write_text(json.dumps({"eos_token_id": ends if len(ends) > 1 else ends[0],
                                   "pad_token_id": tok.pad_token_id}, indent=2) + "\n")


def _reporters(cfg: TrainConfig, out: Path, total: int, progress: bool, module=None) -> list:
    """What rank 0 reports to: metrics.jsonl, the experiment trackers asked for, the progress bar, and a GRPO run's
    sampled completions (``trl.log_completions``)."""
    completions = isinstance(module, GRPOLoss) and module.spec.log_completions
    return [MetricsLog(out / "metrics.jsonl", cfg.logging_steps), *trackers_for(cfg, out),
            ProgressBar(total, progress),
            *([CompletionsLog(module, out / "completions.jsonl", cfg.logging_steps)] if completions else [])]


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
    """metrics.jsonl (and completions.jsonl) of a resumed run ends at its checkpoint's step (a killed run may have
    logged steps past its last checkpoint, which the resumed run computes again); a fresh run starts it empty."""
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
