"""Axolotl config keys lowbit does not spell the same way, so an Axolotl QLoRA config trains unchanged.

Each key translates into lowbit's own keys (``adapter: qlora`` → ``load_in_4bit: true``, ``lora_target_linear``
→ ``lora_target_modules: all-linear``, ``bf16`` → ``compute_dtype``, Axolotl's optimizer names → ``OPTIMIZERS``,
``evals_per_epoch`` / ``saves_per_epoch`` → steps once the data is read), or is accepted because it only picks an
implementation lowbit chooses itself (attention kernels, tf32), or is refused in one line when its value asks for
something lowbit does not do (an 8-bit base, Weights & Biases, DeepSpeed, a replaced chat template). Nothing is
silently dropped: a value that would change the run is either honoured or refused. Torch-free.
"""

from __future__ import annotations

from ..errors import LowbitError

__all__ = ["AXOLOTL_KEYS", "translate"]

# Axolotl's optimizer names → lowbit's (optim/registry.py OPTIMIZERS)
OPTIMIZER_NAMES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
                   "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "paged_adamw",
                   "paged_adamw_8bit": "paged_adamw_8bit"}


def _refuse(key, why):
    raise LowbitError(f"config: {key}: {why}")


def _adapter(v):
    if v not in ("qlora", "lora"):
        _refuse("adapter", f"lowbit trains qlora or lora adapters, got {v!r}")
    return {"load_in_4bit": v == "qlora"}


def _false_only(key, why):
    return lambda v: {} if not v else _refuse(key, why)


def _dtype(key, name):
    def read(v):
        if v in (False, None):
            return {}
        if v in (True, "auto"):
            return {"compute_dtype": name if v is True else "auto"}
        _refuse(key, f"expects true, false or auto, got {v!r}")
    return read


def _nothing(v):
    return {}


def _empty(key, why):
    return lambda v: {} if v in (None, "", [], {}) else _refuse(key, why)


AXOLOTL_KEYS = {
    "adapter": _adapter,
    "lora_target_linear": lambda v: {"lora_target_modules": "all-linear"} if v else {},
    "load_in_8bit": _false_only("load_in_8bit", "an 8-bit base is not lowbit's; use load_in_4bit: true"),
    "lora_fan_in_fan_out": _false_only("lora_fan_in_fan_out", "lowbit finds GPT-2's Conv1D layout itself"),
    "bf16": _dtype("bf16", "bfloat16"),
    "fp16": _dtype("fp16", "float16"),
    "evals_per_epoch": lambda v: {"evals_per_epoch": v},
    "saves_per_epoch": lambda v: {"saves_per_epoch": v},
    "wandb_project": _empty("wandb_project", "Weights & Biases is not built in; use tensorboard: true"),
    "wandb_entity": _empty("wandb_entity", "Weights & Biases is not built in; use tensorboard: true"),
    "wandb_name": _empty("wandb_name", "Weights & Biases is not built in; use tensorboard: true"),
    "wandb_watch": _nothing, "wandb_log_model": _nothing,
    "deepspeed": _empty("deepspeed", "lowbit runs several processes with torchrun (distributed: ddp | fsdp)"),
    "fsdp": _empty("fsdp", "set distributed: fsdp and launch with torchrun"),
    "fsdp_config": _empty("fsdp_config", "set distributed: fsdp and launch with torchrun"),
    "special_tokens": _empty("special_tokens", "lowbit keeps the tokenizer's own special tokens"),
    "tokens": _empty("tokens", "lowbit does not add tokens to the vocabulary"),
    "lora_model_dir": _empty("lora_model_dir", "continue a run with lowbit train --resume"),
    "resume_from_checkpoint": _empty("resume_from_checkpoint", "continue a run with lowbit train --resume"),
    "chat_template": lambda v: {} if v in (None, "tokenizer_default") else
    _refuse("chat_template", f"lowbit renders chats with the tokenizer's own template, got {v!r}"),
    # implementation choices lowbit makes itself (transformers' sdpa attention, CPU or GPU as found)
    **{k: _nothing for k in ("strict", "model_type", "tokenizer_type", "is_llama_derived_model", "tf32",
                             "flash_attention", "sdp_attention", "xformers_attention", "eval_sample_packing",
                             "dataset_prepared_path", "debug", "local_rank", "hub_model_id", "early_stopping_patience",
                             "auto_resume_from_checkpoints", "logging_dir", "eval_table_size",
                             "eval_max_new_tokens")},
}


def translate(key: str, value) -> dict:
    """lowbit's keys for an Axolotl key (``{}`` for an accepted implementation choice)."""
    return AXOLOTL_KEYS[key](value)


def optimizer_name(name):
    """lowbit's name for an Axolotl optimizer name (others unchanged, checked by the config)."""
    return OPTIMIZER_NAMES.get(name, name)
