"""Axolotl's config keys: an Axolotl config trains as it is written. Torch-free.

Every key of Axolotl's schema is one of:

    lowbit's own key          the same name and meaning (``lora_r``, ``warmup_ratio``, ``special_tokens``, …):
                              ``config.TrainConfig``
    translated                a different spelling of something lowbit does (``adapter: qlora`` → ``load_in_4bit``,
                              ``lora_target_linear`` → ``lora_target_modules: all-linear``, ``bf16`` →
                              ``compute_dtype``, Axolotl's optimizer names, ``use_tensorboard``, …): ``TRANSLATIONS``
    an implementation choice  ``axolotl_keys.CHOICES``: accepted, reported
    not built in              ``axolotl_keys.UNSUPPORTED``: accepted while unset, else refused in one line

``Report`` collects what a config's Axolotl keys became; ``lowbit train`` prints it once at the start. A translated
value gives way to lowbit's own key written in the same file (``adapter: lora`` with ``load_in_4bit: true`` is 4-bit
LoRA, as in Axolotl), except ``lora_target_linear: true``, which adds every linear layer to the named targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import LowbitError
from .axolotl_keys import CHOICES, PLUGINS, UNSUPPORTED

__all__ = ["TRANSLATIONS", "Report", "translate", "optimizer_name", "is_axolotl_key", "LR_SCHEDULER_NAMES"]

# Axolotl's (transformers') optimizer names → lowbit's (optim/registry.py OPTIMIZERS), with what differs
OPTIMIZER_NAMES = {
    "adamw_torch": ("adamw", None), "adamw_torch_fused": ("adamw", None), "adamw_hf": ("adamw", None),
    "adamw": ("adamw", None), "adamw_bnb_8bit": ("adamw_8bit", None), "adamw_8bit": ("adamw_8bit", None),
    "paged_adamw_32bit": ("paged_adamw", None), "paged_adamw_8bit": ("paged_adamw_8bit", None),
    "paged_adamw": ("paged_adamw", None),
    "adamw_torch_8bit": ("adamw_8bit", "torchao's 8-bit AdamW → lowbit's blockwise 8-bit AdamW (bitsandbytes' maps)"),
    "adamw_torch_4bit": ("adamw_8bit", "torchao's 4-bit AdamW → lowbit's 8-bit AdamW, its smallest state (2 bytes "
                                       "per LoRA parameter instead of 1)"),
    "ao_adamw_8bit": ("adamw_8bit", "torchao's 8-bit AdamW → lowbit's blockwise 8-bit AdamW"),
    "ao_adamw_4bit": ("adamw_8bit", "torchao's 4-bit AdamW → lowbit's 8-bit AdamW, its smallest state"),
}
# transformers' / Axolotl's scheduler names → lowbit's (training/schedule.py SCHEDULERS)
LR_SCHEDULER_NAMES = {"cosine_with_min_lr": "cosine", "warmup_stable_decay": None, "one_cycle": None, "rex": None,
                      "cosine_with_restarts": None, "reduce_lr_on_plateau": None, "polynomial": None,
                      "inverse_sqrt": None, "log_sweep": None}
_EMPTY = (None, False, "", [], {}, 0)


@dataclass
class Report:
    """What a config's Axolotl keys became: ``translated`` ("adapter: qlora → load_in_4bit: true") and
    ``choices`` ("attn_implementation: lowbit runs attention with …")."""

    translated: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.translated:
            out.append("Axolotl keys translated: " + "; ".join(self.translated))
        if self.choices:
            out.append("Axolotl keys taken as lowbit's implementation choices: " + "; ".join(self.choices))
        return out


def _refuse(key, value, why):
    shown = repr(value)
    if len(shown) > 60:  # a whole section (ebft: {...}): its keys are enough to recognise it
        shown = "{" + ", ".join(map(str, value)) + "}" if isinstance(value, dict) else shown[:57] + "..."
    raise LowbitError(f"config: {key}: {shown} — {why}")


def _empty(value) -> bool:
    return any(value is e or (type(value) is type(e) and value == e) for e in _EMPTY)


def _adapter(v):
    if v in (None, ""):
        return {}
    if v not in ("qlora", "lora"):
        _refuse("adapter", v, "lowbit trains LoRA adapters: qlora (4-bit base) or lora")
    return {"load_in_4bit": v == "qlora"}


def _dtype(key, name):
    def read(v):
        if v in (False, None):
            return {}
        if v in (True, "auto", "full"):
            return {"compute_dtype": "auto" if v == "auto" else name}
        _refuse(key, v, "expects true, false or auto")
    return read


def _strategy(key, per_epoch, steps):
    def read(v):
        if v in (None, "", "steps"):
            return {}
        if v == "epoch":
            return {per_epoch: 1}
        if v == "no":
            return {steps: 0}
        _refuse(key, v, "lowbit takes steps, epoch or no")
    return read


def _peft(v):
    if _empty(v):
        return {}
    if not isinstance(v, dict) or set(v) - {"loftq_config"}:
        _refuse("peft", v, "lowbit reads peft: {loftq_config: {loftq_bits: 4}} only (LoRA's own keys are lora_*)")
    bits = (v.get("loftq_config") or {}).get("loftq_bits", 4)
    if bits != 4:
        _refuse("peft.loftq_config.loftq_bits", bits, "LoftQ starts from the 4-bit base lowbit stores; 2- and "
                "3-bit bases: quant_type nf2 / nf3 with lora_init: loftq")
    # peft's LoftQ replaces a 16-bit base's weights by their NF4 rounding: lowbit stores that base in 4 bits
    return {"lora_init": "loftq", "load_in_4bit": True}


def _init_weights(v):
    if v in (None, True):
        return {}
    if v == "loftq":
        return {"lora_init": "loftq"}
    _refuse("peft_init_lora_weights", v, "lowbit starts LoRA as peft's default (true) or from LoftQ (loftq)")


BNB_KEYS = {"bnb_4bit_use_double_quant": "double_quant", "bnb_4bit_quant_type": "quant_type",
            "bnb_4bit_compute_dtype": "compute_dtype", "load_in_4bit": "load_in_4bit", "load_in_8bit": "load_in_8bit"}


def _bnb(v):
    if _empty(v):
        return {}
    if not isinstance(v, dict):
        _refuse("bnb_config_kwargs", v, "expects a mapping of BitsAndBytesConfig arguments")
    out = {}
    for k, x in v.items():
        if k in BNB_KEYS:
            out[BNB_KEYS[k]] = x
        elif k in ("bnb_4bit_quant_storage",) and x in ("uint8", "torch.uint8"):
            continue
        elif k in ("llm_int8_threshold", "llm_int8_has_fp16_weight"):
            continue  # lowbit's 8-bit layer dequantizes for the matmul: no outlier threshold to apply
        else:
            _refuse(f"bnb_config_kwargs.{k}", x, "lowbit reads bnb_4bit_use_double_quant, bnb_4bit_quant_type, "
                    "bnb_4bit_compute_dtype and uint8 storage")
    return out


def _fsdp(key):
    def read(v):
        if _empty(v):
            return {}
        if key == "fsdp_version" and v not in (1, 2):
            _refuse(key, v, "expects 1 or 2 (lowbit runs FSDP2 either way)")
        out = {"distributed": "fsdp"}
        if (key == "fsdp_config" and isinstance(v, dict) and v.get("activation_checkpointing")) \
                or (isinstance(v, dict) and v.get("fsdp_activation_checkpointing")):
            out["gradient_checkpointing"] = True
        return out
    return read


def _plugins(v, report: Report | None = None):
    for name in v or []:
        short = str(name).rsplit(".", 2)[-2] if "." in str(name) else str(name)
        if short not in PLUGINS:
            _refuse("plugins", name, f"lowbit has no counterpart of this plugin (it does itself: "
                    f"{', '.join(PLUGINS)})")
        if report is not None:
            report.choices.append(f"plugins: {short} ({PLUGINS[short]})")
    return {}


def _memory(v):
    if _empty(v):
        return {}
    return {"memory_limit": f"{v}GB" if isinstance(v, (int, float)) else str(v)}


def _refuse_set(key, why):
    return lambda v: {} if _empty(v) else _refuse(key, v, why)


def _offloading(v):
    if _empty(v):
        return {}
    return {"gradient_checkpointing": "offload_disk" if v == "disk" else "offload"}


def _model_config(v):
    return {} if _empty(v) else {"model_config": v}


TRANSLATIONS = {
    "adapter": _adapter,
    "lora_target_linear": lambda v: {"lora_target_modules": "all-linear"} if v else {},
    "bf16": _dtype("bf16", "bfloat16"), "fp16": _dtype("fp16", "float16"),
    "bfloat16": _dtype("bfloat16", "bfloat16"), "float16": _dtype("float16", "float16"),
    "float32": _dtype("float32", "float32"),
    "use_tensorboard": lambda v: {"tensorboard": bool(v)},
    "peft_use_rslora": lambda v: {"use_rslora": bool(v)},
    "peft": _peft, "peft_init_lora_weights": _init_weights,
    "bnb_config_kwargs": _bnb,
    "fsdp": _fsdp("fsdp"), "fsdp_config": _fsdp("fsdp_config"), "fsdp_version": _fsdp("fsdp_version"),
    "eval_strategy": _strategy("eval_strategy", "evals_per_epoch", "eval_steps"),
    "evaluation_strategy": _strategy("evaluation_strategy", "evals_per_epoch", "eval_steps"),
    "save_strategy": _strategy("save_strategy", "saves_per_epoch", "save_steps"),
    "gpu_memory_limit": _memory,
    "activation_offloading": _offloading,
    "noisy_embedding_alpha": lambda v: {} if _empty(v) else {"neftune_noise_alpha": v},
    "dataset_num_proc": lambda v: {} if _empty(v) else {"dataset_processes": v},
    "overrides_of_model_config": _model_config,
    "rope_scaling": lambda v: {} if _empty(v) else {"model_config": {"rope_scaling": v}},
    "batch_size": lambda v: {} if _empty(v) else {"_batch_size": v},
    "resume_from_checkpoint": _refuse_set("resume_from_checkpoint", "continue the run in output_dir with lowbit "
                                          "train --resume (or auto_resume_from_checkpoints: true)"),
    "model_kwargs": _refuse_set("model_kwargs", UNSUPPORTED["overrides_of_model_kwargs"][0]),
    "base_model_config": _refuse_set("base_model_config", "the model folder's own config.json is read; override "
                                     "fields with model_config: {...}"),
    "shrink_embeddings": _refuse_set("shrink_embeddings", "the embeddings keep their rows (new tokens add rows)"),
    "peft_trainable_token_indices": lambda v: {} if _empty(v) else {"trainable_token_indices": v},
    "dpo_beta": lambda v: {} if _empty(v) else {"rl_beta": v},
    "torch_compile": lambda v: {} if v is None else {"compile": v},
}


def is_axolotl_key(key: str) -> bool:
    return key in TRANSLATIONS or key in CHOICES or key in UNSUPPORTED or key == "plugins" or key == "optimizer"


def translate(key: str, value, report: Report | None = None) -> dict:
    """lowbit's keys for an Axolotl key (``{}`` for an accepted implementation choice or an unset key); refuses
    what lowbit does not do."""
    if key == "plugins":
        return _plugins(value, report)
    if key in CHOICES:
        if report is not None and not _empty(value):
            report.choices.append(f"{key} ({CHOICES[key]})")
        return {}
    if key in UNSUPPORTED:
        why, default = UNSUPPORTED[key]
        if _empty(value) or value == default:
            return {}
        _refuse(key, value, why)
    out = TRANSLATIONS[key](value)
    if report is not None and not _empty(value) and out:
        shown = ", ".join(f"{k}: {_show(v)}" for k, v in out.items() if not k.startswith("_"))
        report.translated.append(f"{key}: {_show(value)} → {shown or _batch_note(value)}")
    return out


def _show(v) -> str:
    return "true" if v is True else "false" if v is False else str(v)


def _batch_note(v) -> str:
    return f"gradient_accumulation_steps: {v} ÷ micro_batch_size"


def optimizer_name(name, report: Report | None = None):
    """lowbit's name for an Axolotl optimizer name (others unchanged, checked by the config)."""
    new, note = OPTIMIZER_NAMES.get(name, (name, None))
    if report is not None and new != name:
        (report.choices if note else report.translated).append(f"optimizer: {name} ({note})" if note else
                                                             f"optimizer: {name} → {new}")
    return new


def scheduler_name(name, report: Report | None = None):
    """lowbit's name for a transformers / Axolotl scheduler name; the ones lowbit has no counterpart of are refused."""
    if name not in LR_SCHEDULER_NAMES:
        return name
    new = LR_SCHEDULER_NAMES[name]
    if new is None:
        _refuse("lr_scheduler", name, "lowbit schedules cosine, linear, constant or constant_with_warmup "
                "(cosine_min_lr_ratio, cosine_constant_lr_ratio and lr_quadratic_warmup shape them)")
    if report is not None:
        report.translated.append(f"lr_scheduler: {name} → {new}")
    return new


def gradient_accumulation(batch_size: int, micro_batch_size: int) -> int:
    """Axolotl's ``batch_size`` (per optimizer step, one process) as gradient accumulation steps."""
    if batch_size % micro_batch_size:
        raise LowbitError(f"config: batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size}")
    return max(1, math.ceil(batch_size / micro_batch_size))
