"""Training configuration: one flat dataclass; YAML files and command-line flags set the same keys.

Key names follow Axolotl / LLaMA-Factory / mlx-lm. Unknown keys fail with a "did you mean" hint; values of the
wrong type, and names not in the registries (quant types, optimizers, schedulers, data formats, dtypes), fail
naming the key. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.chat_templates import check_chat_template
from ..data.formats import FORMATS
from ..data.python_funcs import beside
from ..data.sources import parse_sources
from ..dtypes import DTYPE_ALIASES, DTYPES
from ..errors import LowbitError
from ..nn.lora_options import ALL_LINEAR, LORA_INITS
from ..optim.registry import OPTIMIZERS
from ..quant.spec import QUANT_TYPES, QuantSpec, calibration_stages
from ..sizes import parse_size
from .axolotl import (
    TRANSLATIONS,
    Report,
    gradient_accumulation,
    is_axolotl_key,
    optimizer_name,
    scheduler_name,
    translate,
)
from .axolotl_keys import CHOICES as AXOLOTL_CHOICES
from .axolotl_keys import UNSUPPORTED
from .preference_spec import METHODS as PREFERENCE_METHODS
from .preference_spec import validate_preference
from .schedule import SCHEDULERS
from .values import UNSET, kinds_of, read_value

__all__ = ["TrainConfig", "load_config", "apply_overrides", "config_to_yaml", "config_changes", "RESUMABLE",
           "DISTRIBUTED"]


@dataclass
class TrainConfig:
    # model
    base_model: str = "smollm2-135m"
    load_in_4bit: bool = True
    load_in_8bit: bool = False                  # LLM.int8 storage instead (bitsandbytes' Int8Params + SCB)
    quant_type: str = "nf4"                     # quant.spec.QUANT_TYPES
    double_quant: bool = True
    blocksize: int = 64
    quant_calibration: str = "none"             # quant.spec.calibration_stages (awq+clip+gptq, …): calibrate the
    quant_calibration_samples: int = 256        # k-bit base on the training data first (saved to output_dir/base)
    train_quant_scales: bool = False            # the base's block scales train with the adapter (codes frozen)
    compute_dtype: str = "auto"                 # auto | dtypes.DTYPES
    trust_remote_code: bool = False
    device: str = "auto"                        # auto | cpu | cuda | cuda:N (auto: the GPU when there is one)
    tokenizer_config: str = ""                  # a folder whose tokenizer to use (default: the model's)
    model_config: dict | None = None            # overrides of the model's config.json (e.g. rope_scaling)
    quantize_vision: bool = False               # a vision-language model's vision tower in 4 bits too
    # adapter
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0                   # 0 is fastest; 0.05–0.1 for small data sets
    lora_target_modules: str | list = ALL_LINEAR
    lora_target_parameters: list | None = None  # expert matrices too (MoE: experts.gate_up_proj, …)
    use_rslora: bool = False
    lora_init: str = "default"                  # nn.lora_options.LORA_INITS
    lora_model_dir: str = ""                    # start from this adapter's weights (a finished run or peft's)
    lora_modules_to_save: list | None = None    # modules trained whole in float32 beside LoRA (embed_tokens, lm_head)
    unfrozen_parameters: list | None = None     # regexes of non-quantized parameters to train (norms, …)
    trainable_token_indices: list | dict | None = None  # embedding rows to train (peft's trainable_token_indices)
    loraplus_lr_ratio: float = 0.0              # > 0: LoRA+ (B's learning rate = ratio × A's)
    # tokenizer and chat template
    chat_template: str = "tokenizer_default"    # data.chat_templates.FORMATS, jinja, tokenizer_default[_fallback_X]
    chat_template_jinja: str = ""               # with chat_template: jinja — the template, or a file holding it
    chat_template_kwargs: dict | None = None    # passed to the template (e.g. enable_thinking: false)
    default_system_message: str = ""            # a system turn for conversations that have none
    eot_tokens: list | None = None              # tokens that end a turn: learned after each trained turn
    special_tokens: dict | None = None          # pad/bos/eos/unk token: set (an existing token) or added
    tokens: list | None = None                  # new tokens: rows added to the embeddings and head, trained
    resize_token_embeddings_to_32x: bool = False
    mean_resizing_embeddings: bool = False      # new rows start at the mean of the old ones (else random)
    embedding_lr: float = 0.0                   # learning rate of trained embedding/head rows (0: learning_rate)
    embedding_lr_scale: float = 0.0             # … or learning_rate × this
    # data
    datasets: str | list = "chatterbot"
    test_datasets: str | list | None = None     # held-out data from its own files (instead of val_set_size)
    dataset_format: str = "auto"                # auto | data.formats.FORMATS
    val_set_size: float = 0.05
    sequence_len: int = 512
    excess_length_strategy: str = "truncate"    # samples longer than sequence_len: truncate | drop | raise
    min_sample_len: int = 0                     # drop samples of fewer tokens
    train_on_inputs: bool = False
    sample_packing: bool = False                # several samples per row, each attending only to itself
    group_by_length: bool = True                # unpacked: batch samples of similar length (little padding)
    pad_to_sequence_len: bool = False           # unpacked: pad every batch to sequence_len (fixed shapes)
    pad_to_multiple_of: int = 0                 # pad each batch's width to a multiple of this
    curriculum_sampling: bool = False           # the data in file order, not shuffled
    dataset_exact_deduplication: bool = False   # drop records identical to an earlier one
    dataset_processes: int = 0                  # tokenizing processes (0: 2 for 20,000 rows or more, else 1)
    # optimisation
    micro_batch_size: int = 4
    eval_batch_size: int = 0                    # 0: micro_batch_size
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = 0                          # > 0 overrides num_epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"                # training.schedule.SCHEDULERS
    warmup_steps: int = 10
    warmup_ratio: float = 0.0                   # > 0: warmup_steps = ⌊ratio × total steps⌋ (as Axolotl)
    lr_quadratic_warmup: bool = False
    cosine_min_lr_ratio: float = 0.0            # the schedule decays to this fraction of learning_rate
    cosine_constant_lr_ratio: float = 0.0       # > 0: hold the minimum from this fraction of the steps on
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"                    # optim.registry.OPTIMIZERS
    optimizer_budget_mb: float = 0.0            # paged optimizers: device bytes for state (0 = one page)
    gradient_checkpointing: bool | str = False  # true | false | offload (layer inputs in host memory) | offload_disk
    tiled_mlp: bool | str = False               # true | false | auto (from 8,192 tokens): MLPs over sequence shards
    tiled_mlp_num_shards: int = 0               # 0: from the memory target (nn/mlp_shards.py)
    compile: bool | str = "auto"                # true | false | auto: decoder layers through torch.compile
    neftune_noise_alpha: float = 0.0            # > 0: NEFTune noise on the input embeddings while training
    # bookkeeping
    eval_steps: int | float = 50                # 0: only before and after training; 0 < x < 1: that fraction of
    save_steps: int | float = 100               # the steps (as Axolotl); save_steps 0: only at the end
    evals_per_epoch: int = 0                    # > 0: eval_steps from the epoch's length (Axolotl's key)
    saves_per_epoch: int = 0                    # > 0: save_steps likewise
    save_first_step: bool = False
    save_total_limit: int = 2
    early_stopping_patience: int = 0            # > 0: stop after this many evaluations without a new best
    loss_watchdog_threshold: float = 0.0        # > 0: stop when the loss stays above this …
    loss_watchdog_patience: int = 3             # … for this many steps in a row
    logging_steps: int = 1
    output_dir: str = "runs/lowbit"
    auto_resume_from_checkpoints: bool = False  # continue the run in output_dir if it has a checkpoint
    seed: int = 0
    memory_limit: str = ""                      # memory the pre-flight plans for (e.g. 24GB; default: free memory)
    # experiment trackers (training/trackers.py)
    tensorboard: bool = False
    use_wandb: bool = False                     # also on when wandb_project is set
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_name: str = ""
    wandb_run_id: str = ""
    wandb_mode: str = ""                        # online | offline | disabled (default: wandb's own)
    use_mlflow: bool = False                    # also on when mlflow_tracking_uri / _experiment_name is set
    mlflow_tracking_uri: str = ""
    mlflow_experiment_name: str = ""
    mlflow_run_name: str = ""
    # preference tuning (training/preference_loss.py): with rl set the data are pairs, or KTO's labelled examples
    rl: str = ""                                # "" (supervised) | dpo | ipo | orpo | kto | simpo | grpo
    rl_beta: float | None = None                # β (default 0.1, TRL's); trl: {beta: …} wins, as in Axolotl
    trl: dict | None = None                     # Axolotl's trl: section (beta; GRPO's keys: training/grpo_spec.py)
    dpo_loss_type: str | list | None = None     # sigmoid (default) | hinge | ipo | robust, or a list of them …
    dpo_loss_weights: list | None = None        # … weighted (default: 1 each)
    dpo_label_smoothing: float = 0.0            # ε of robust DPO and SimPO
    orpo_alpha: float | None = None             # ORPO's odds-ratio weight (default: β)
    simpo_gamma: float = 0.5                    # SimPO's target margin γ
    cpo_alpha: float = 1.0                      # SimPO: weight of the chosen completions' NLL (0: pure SimPO)
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    precompute_ref_log_probs: bool = False      # reference log-probs computed once before training, not per step
    max_prompt_len: int = 0                     # > 0: prompts keep their last this many tokens
    # several processes (torchrun --nproc-per-node N -m lowbit train …)
    distributed: str = "auto"                   # auto | none | ddp | fsdp   (auto: ddp when WORLD_SIZE > 1)
    ddp_timeout: int = 1800                     # seconds a collective may wait (a dead rank ends the run by then)

    def validate(self) -> TrainConfig:
        def bad(key, why):
            raise LowbitError(f"config: {key} {why}")

        if self.rl in ("gdpo", "ebft"):
            validate_preference(self, bad)
        for k in POSITIVE:
            if getattr(self, k) <= 0:
                bad(k, f"must be > 0, got {getattr(self, k)}")
        for k in NON_NEGATIVE:
            if getattr(self, k) < 0:
                bad(k, f"must be >= 0, got {getattr(self, k)}")
        for k, ok in CHOICES.items():
            if getattr(self, k) not in ok:
                names = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in ok)
                bad(k, f"must be one of {names}, got {getattr(self, k)!r}")
        for k in ("lora_dropout", "cosine_min_lr_ratio", "cosine_constant_lr_ratio", "adam_beta1", "adam_beta2",
                  "warmup_ratio"):
            if getattr(self, k) >= 1 and not (k.startswith("cosine") and getattr(self, k) == 1):
                bad(k, f"must be < 1, got {getattr(self, k)}")
        calibration_stages(self.quant_calibration, "config: quant_calibration")
        for k in ("quant_calibration", "train_quant_scales"):
            if getattr(self, k) not in ("none", False) and not self.load_in_4bit:
                bad(k, "needs load_in_4bit: true (an 8-bit or 16-bit base has no k-bit codes and block scales)")
        if self.quant_calibration != "none" and self.quant_calibration_samples <= 0:
            bad("quant_calibration_samples", f"must be > 0, got {self.quant_calibration_samples}")
        for k in ("eval_steps", "save_steps"):
            v = getattr(self, k)
            if isinstance(v, float) and not (0 < v < 1 or v.is_integer()):
                bad(k, f"must be a whole number of steps or a fraction of them between 0 and 1, got {v}")
        if self.load_in_8bit and self.load_in_4bit:
            bad("load_in_8bit", "and load_in_4bit are both true: choose one storage for the base")
        if self.lora_init == "loftq" and not self.load_in_4bit:
            bad("lora_init:", "loftq needs a 4-bit (or nf3 / nf2) base: an 8-bit or 16-bit one has little error to "
                "absorb")
        for k in ("lora_target_parameters", "lora_modules_to_save", "unfrozen_parameters", "eot_tokens", "tokens"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) and x for x in v)):
                bad(k, f"expects a list of names, got {v!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if (self.model_config or {}).get("output_router_logits"):
            bad("model_config:", "output_router_logits: true — lowbit does not add the router's load-balancing loss "
                "(its loss is the cross-entropy of the learned tokens); leave it out")
        for k in self.special_tokens or {}:
            if k not in SPECIAL_TOKENS:
                bad("special_tokens:", f"unknown {k!r}; lowbit sets {', '.join(SPECIAL_TOKENS)}")
        validate_preference(self, bad)
        try:
            check_chat_template(self.chat_template, self.chat_template_jinja)
            self.quant_spec()
            parse_sources(self.datasets, self.dataset_format, custom=self.rl == "grpo")
            if self.test_datasets is not None:
                parse_sources(self.test_datasets, self.dataset_format, custom=self.rl == "grpo")
            if self.memory_limit:
                parse_size(self.memory_limit)
        except LowbitError as e:
            raise LowbitError(f"config: {e}") from None
        return self

    def quant_spec(self) -> QuantSpec | None:
        """How the base is stored (None: ``load_in_4bit: false`` and ``load_in_8bit: false``, 16-bit LoRA)."""
        if self.load_in_8bit:
            return QuantSpec("int8", double_quant=False)
        return QuantSpec(self.quant_type, self.blocksize, self.double_quant) if self.load_in_4bit else None

    @property
    def checkpointing(self) -> bool:
        """Whether decoder layers are recomputed in backward (``gradient_checkpointing`` true or an offload)."""
        return self.gradient_checkpointing in (True, *OFFLOADS)


POSITIVE = ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "blocksize", "ddp_timeout",
            "logging_steps", "learning_rate", "num_epochs", "adam_epsilon", "loss_watchdog_patience")
NON_NEGATIVE = ("max_steps", "warmup_steps", "evals_per_epoch", "saves_per_epoch", "weight_decay", "max_grad_norm",
                "lora_dropout", "val_set_size", "optimizer_budget_mb", "eval_steps", "save_steps", "dataset_processes",
                "warmup_ratio", "cosine_min_lr_ratio", "cosine_constant_lr_ratio", "adam_beta1", "adam_beta2",
                "loraplus_lr_ratio", "eval_batch_size", "neftune_noise_alpha", "early_stopping_patience",
                "loss_watchdog_threshold", "min_sample_len", "pad_to_multiple_of", "embedding_lr",
                "embedding_lr_scale", "simpo_gamma", "cpo_alpha", "kto_desirable_weight", "kto_undesirable_weight",
                "max_prompt_len", "tiled_mlp_num_shards")

DISTRIBUTED, OFFLOADS = ("auto", "none", "ddp", "fsdp"), ("offload", "offload_disk")  # OFFLOADS: checkpoints aside
SPECIAL_TOKENS, EXCESS_LENGTH = ("pad_token", "bos_token", "eos_token", "unk_token"), ("truncate", "drop", "raise")

# the keys that name something, and the tables they name
CHOICES = {"quant_type": tuple(QUANT_TYPES), "compute_dtype": ("auto", *DTYPES), "lora_init": tuple(LORA_INITS),
           "dataset_format": ("auto", *FORMATS), "lr_scheduler": tuple(SCHEDULERS), "optimizer": tuple(OPTIMIZERS),
           "distributed": DISTRIBUTED, "excess_length_strategy": EXCESS_LENGTH, "tiled_mlp": (False, True, "auto"),
           "compile": (False, True, "auto"), "gradient_checkpointing": (False, True, *OFFLOADS),
           "rl": ("", *PREFERENCE_METHODS, "grpo")}

# keys a resumed run may change: they leave the arithmetic of every step the same (logging, evaluation and
# checkpoint cadence, memory-only settings) or only say how long to go on (max_steps, num_epochs)
# (the world size and distributed mode are checked on their own: a checkpoint resumes under the same ones)
RESUMABLE = {"max_steps", "num_epochs", "eval_steps", "save_steps", "save_total_limit", "logging_steps", "tensorboard",
             "output_dir", "gradient_checkpointing", "optimizer_budget_mb", "trust_remote_code", "distributed",
             "ddp_timeout", "dataset_processes", "evals_per_epoch", "saves_per_epoch", "save_first_step",
             "early_stopping_patience", "loss_watchdog_threshold", "loss_watchdog_patience", "memory_limit",
             "auto_resume_from_checkpoints", "eval_batch_size", "use_wandb", "wandb_project", "wandb_entity",
             "wandb_name", "wandb_run_id", "wandb_mode", "use_mlflow", "mlflow_tracking_uri",
             "mlflow_experiment_name", "mlflow_run_name"}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value, from_string: bool):
    if key == "gradient_checkpointing" and str(value).lower() in OFFLOADS:
        return str(value).lower()
    if key in ("tiled_mlp", "compile") and str(value).lower() == "auto":
        return "auto"
    if key in ("lr_scheduler", "optimizer") and isinstance(value, str):
        return value.strip()
    if key == "compute_dtype" and value in DTYPE_ALIASES:  # bf16 → bfloat16
        return DTYPE_ALIASES[value]
    return read_value(key, value, kinds_of(_HINTS[key]), from_string)


def _unknown(key: str) -> LowbitError:
    names = list(_FIELDS) + [k for k in (*TRANSLATIONS, *AXOLOTL_CHOICES, *UNSUPPORTED)]
    near = difflib.get_close_matches(key, names, n=1)
    return LowbitError(f"config: unknown key {key!r}" + (f" — did you mean {near[0]!r}?" if near else ""))


def apply_overrides(cfg: TrainConfig, values: dict, from_string: bool = False, report: Report | None = None
                    ) -> TrainConfig:
    """Set keys from a mapping (a YAML file, flags): lowbit's keys, and Axolotl's (``training/axolotl.py``:
    translated, taken as implementation choices, or refused). Values are read as Axolotl reads them
    (``values.py``: null is the default, ``2e-5`` a number). A key given as itself wins over a translation
    into it from another key of the same mapping."""
    mine, translated = {}, {}
    for key, value in values.items():
        k = key.replace("-", "_")
        if k in _FIELDS:
            mine[k] = value
        elif is_axolotl_key(k):
            offload = translated.get("gradient_checkpointing")
            translated.update(translate(k, value, report))
            if offload in OFFLOADS:  # activation_offloading outranks an FSDP activation_checkpointing: true
                translated["gradient_checkpointing"] = offload
        else:
            raise _unknown(key)
    linear = values.get("lora_target_linear") is True  # Axolotl adds every linear layer to the named targets
    loftq = {"load_in_4bit": True} if translated.get("lora_init") == "loftq" and "load_in_4bit" not in mine else {}
    merged = {**translated, **mine, **({"lora_target_modules": ALL_LINEAR} if linear else {}), **loftq}
    if translated.get("gradient_checkpointing") in OFFLOADS and "gradient_checkpointing" in mine:
        if not _coerce("gradient_checkpointing", mine["gradient_checkpointing"], from_string):
            raise LowbitError("config: activation_offloading needs gradient_checkpointing, which is false")
        merged["gradient_checkpointing"] = translated["gradient_checkpointing"]  # checkpointing, checkpoints aside
    if merged.get("load_in_8bit") is True and "load_in_4bit" not in mine:
        merged["load_in_4bit"] = False  # an 8-bit base instead of lowbit's default 4-bit one
    if translated.get("load_in_4bit") is True and mine.get("load_in_4bit") is False:
        raise LowbitError("config: adapter: qlora needs a 4-bit base, but load_in_4bit is false")
    if mine.get("warmup_steps") is not None and _coerce("warmup_ratio", mine.get("warmup_ratio"), from_string) \
            not in (UNSET, 0):  # a 0 ratio is no ratio (a run's config.yaml writes both keys)
        raise LowbitError("config: warmup_steps and warmup_ratio are both set: give one")
    batch = merged.pop("_batch_size", None)
    for k, value in merged.items():
        if k == "optimizer" and isinstance(value, str):
            value = optimizer_name(value, report)
        elif k == "lr_scheduler" and isinstance(value, str):
            value = scheduler_name(value, report)
        v = _coerce(k, value, from_string)
        if v is not UNSET:
            setattr(cfg, k, v)
    if batch is not None:
        cfg.gradient_accumulation_steps = gradient_accumulation(_coerce("micro_batch_size", batch, from_string),
                                                                cfg.micro_batch_size)
    return cfg


def load_config(path: str | Path | None, report: Report | None = None) -> TrainConfig:
    """The config in a YAML file (defaults for what it leaves out); ``report`` collects what its Axolotl keys
    became."""
    cfg = TrainConfig()
    if path is None:
        return cfg
    p = Path(path)
    if not p.exists():
        raise LowbitError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise LowbitError(f"{p}{f':{line + 1}' if line is not None else ''}: invalid YAML") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):  # `? ` or `1:` make other keys
        raise LowbitError(f"{p}: expected a mapping of names (like base_model) to values")
    try:
        return _python_beside(apply_overrides(cfg, data, report=report), p.parent)
    except LowbitError as e:
        raise LowbitError(f"{p}: {e}") from None


def _python_beside(cfg: TrainConfig, folder: Path) -> TrainConfig:
    """``trl.reward_funcs`` and, under rl: grpo, the datasets' ``type`` read beside the config file
    (``data.python_funcs.beside``)."""
    changes = {}
    funcs = (cfg.trl or {}).get("reward_funcs")
    if isinstance(funcs, list):
        changes["trl"] = {**cfg.trl, "reward_funcs": [beside(f, folder) for f in funcs]}
    if cfg.rl == "grpo" and isinstance(cfg.datasets, list):
        changes["datasets"] = [{**d, "type": beside(d["type"], folder)} if isinstance(d, dict) and "type" in d else d
                               for d in cfg.datasets]
    return dataclasses.replace(cfg, **changes)


def config_to_yaml(cfg: TrainConfig) -> str:  # as load_config reads it: no warmup_steps where a ratio replaces it
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if not (k == "warmup_steps" and cfg.warmup_ratio)}
    return yaml.safe_dump(values, sort_keys=False)


def config_changes(saved: dict, cfg: TrainConfig) -> tuple[list[str], list[str]]:
    """What differs between a checkpoint's saved config and ``cfg``: ``(changes the math, harmless)``, each as
    ``"key: old -> new"``. A key the saved config lacks (written by an older version) counts as its default."""
    math_changes, harmless = [], []
    for name, f in _FIELDS.items():
        old = saved.get(name, f.default)
        new = getattr(cfg, name)
        if old != new:
            (harmless if name in RESUMABLE else math_changes).append(f"{name}: {old!r} -> {new!r}")
    return math_changes, harmless
