"""Training configuration: one flat dataclass; YAML files and command-line flags set the same keys.

Key names follow Axolotl / LLaMA-Factory / mlx-lm. Unknown keys fail with a "did you mean" hint; values of the
wrong type, and names not in the registries (quant types, optimizers, schedulers, data formats, dtypes), fail
naming the key. Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..data.formats import FORMATS
from ..data.sources import parse_sources
from ..dtypes import DTYPES
from ..errors import LowbitError
from ..nn.lora_options import ALL_LINEAR, LORA_INITS
from ..optim.registry import OPTIMIZERS
from ..quant.spec import CALIBRATIONS, QUANT_TYPES, QuantSpec
from .axolotl import AXOLOTL_KEYS, optimizer_name, translate
from .schedule import SCHEDULERS

__all__ = ["TrainConfig", "load_config", "apply_overrides", "config_to_yaml", "config_changes", "RESUMABLE",
           "DISTRIBUTED"]


@dataclass
class TrainConfig:
    # model
    base_model: str = "smollm2-135m"
    load_in_4bit: bool = True
    quant_type: str = "nf4"                     # quant.spec.QUANT_TYPES
    double_quant: bool = True
    blocksize: int = 64
    quant_calibration: str = "none"             # quant.spec.CALIBRATIONS: calibrate the 4-bit base on the training
    quant_calibration_samples: int = 256        # data first (saved to output_dir/base)
    compute_dtype: str = "auto"                 # auto | dtypes.DTYPES
    trust_remote_code: bool = False
    # adapter
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0                   # 0 is fastest; 0.05–0.1 for small data sets
    lora_target_modules: str | list = ALL_LINEAR
    use_rslora: bool = False
    lora_init: str = "default"                  # nn.lora_options.LORA_INITS
    # data
    datasets: str | list = "chatterbot"
    dataset_format: str = "auto"                # auto | data.formats.FORMATS
    val_set_size: float = 0.05
    sequence_len: int = 512
    train_on_inputs: bool = False
    sample_packing: bool = False                # several samples per row, each attending only to itself
    group_by_length: bool = True                # unpacked: batch samples of similar length (little padding)
    pad_to_sequence_len: bool = False           # unpacked: pad every batch to sequence_len (fixed shapes)
    dataset_processes: int = 0                  # tokenizing processes (0: 2 for 20,000 rows or more, else 1)
    # optimisation
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = 0                          # > 0 overrides num_epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"                # training.schedule.SCHEDULERS
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"                    # optim.registry.OPTIMIZERS
    optimizer_budget_mb: float = 0.0            # paged optimizers: device bytes for state (0 = one page)
    gradient_checkpointing: bool = False
    # bookkeeping
    eval_steps: int = 50
    save_steps: int = 100
    evals_per_epoch: int = 0                    # > 0: eval_steps from the epoch's length (Axolotl's key)
    saves_per_epoch: int = 0                    # > 0: save_steps likewise
    save_total_limit: int = 2
    logging_steps: int = 1
    output_dir: str = "runs/lowbit"
    seed: int = 0
    tensorboard: bool = False
    # several processes (torchrun --nproc-per-node N -m lowbit train …)
    distributed: str = "auto"                   # auto | none | ddp | fsdp   (auto: ddp when WORLD_SIZE > 1)
    ddp_timeout: int = 1800                     # seconds a collective may wait (a dead rank ends the run by then)

    def validate(self) -> TrainConfig:
        def bad(key, why):
            raise LowbitError(f"config: {key} {why}")

        for k in ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "blocksize",
                  "eval_steps", "ddp_timeout",
                  "save_steps", "logging_steps"):
            if getattr(self, k) <= 0:
                bad(k, f"must be > 0, got {getattr(self, k)}")
        for k in ("learning_rate", "num_epochs"):
            if getattr(self, k) <= 0:
                bad(k, f"must be > 0, got {getattr(self, k)}")
        for k in ("max_steps", "warmup_steps", "evals_per_epoch", "saves_per_epoch", "weight_decay", "max_grad_norm",
                  "lora_dropout", "val_set_size", "optimizer_budget_mb"):
            if getattr(self, k) < 0:
                bad(k, f"must be >= 0, got {getattr(self, k)}")
        for k, ok in CHOICES.items():
            if getattr(self, k) not in ok:
                bad(k, f"must be one of {', '.join(ok)}, got {getattr(self, k)!r}")
        if self.lora_dropout >= 1:
            bad("lora_dropout", f"must be < 1, got {self.lora_dropout}")
        if self.dataset_processes < 0:
            bad("dataset_processes", f"must be >= 0, got {self.dataset_processes}")
        if self.quant_calibration != "none":
            if not self.load_in_4bit:
                bad("quant_calibration", "needs load_in_4bit: true (there is no 4-bit base to calibrate)")
            if self.quant_calibration_samples <= 0:
                bad("quant_calibration_samples", f"must be > 0, got {self.quant_calibration_samples}")
        try:
            self.quant_spec()
            parse_sources(self.datasets, self.dataset_format)
        except LowbitError as e:
            raise LowbitError(f"config: {e}") from None
        return self

    def quant_spec(self) -> QuantSpec | None:
        """How the base is stored (None: ``load_in_4bit: false``, 16-bit LoRA)."""
        return QuantSpec(self.quant_type, self.blocksize, self.double_quant) if self.load_in_4bit else None


DISTRIBUTED = ("auto", "none", "ddp", "fsdp")

# the keys that name something, and the tables they name
CHOICES = {"quant_type": tuple(QUANT_TYPES), "quant_calibration": tuple(CALIBRATIONS),
           "compute_dtype": ("auto", *DTYPES), "lora_init": tuple(LORA_INITS),
           "dataset_format": ("auto", *FORMATS), "lr_scheduler": tuple(SCHEDULERS), "optimizer": tuple(OPTIMIZERS),
           "distributed": DISTRIBUTED}

# keys a resumed run may change: they leave the arithmetic of every step the same (logging, evaluation and
# checkpoint cadence, memory-only settings) or only say how long to go on (max_steps, num_epochs)
# (the world size and distributed mode are checked on their own: a checkpoint resumes under the same ones)
RESUMABLE = {"max_steps", "num_epochs", "eval_steps", "save_steps", "save_total_limit", "logging_steps",
             "tensorboard", "output_dir", "gradient_checkpointing", "optimizer_budget_mb", "trust_remote_code",
             "distributed", "ddp_timeout", "dataset_processes", "evals_per_epoch", "saves_per_epoch"}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(key: str, value, from_string: bool):
    hint = _HINTS[key]
    kinds = typing.get_args(hint) or (hint,)
    if from_string:
        if bool in kinds:
            low = str(value).lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise LowbitError(f"config: {key} expects true/false, got {value!r}")
        if list in kinds and "," in str(value):
            return [v.strip() for v in str(value).split(",") if v.strip()]
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(value)
                except ValueError:
                    raise LowbitError(f"config: {key} expects {kind.__name__}, got {value!r}") from None
        return value
    if bool in kinds:
        if not isinstance(value, bool):
            raise LowbitError(f"config: {key} expects true/false, got {value!r} ({type(value).__name__})")
        return value
    if float in kinds and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if int in kinds:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LowbitError(f"config: {key} expects an integer, got {value!r} ({type(value).__name__})")
        return value
    if str in kinds and isinstance(value, str):
        return value
    if list in kinds and isinstance(value, list):
        return value
    expected = " or ".join(k.__name__ for k in kinds)
    raise LowbitError(f"config: {key} expects {expected}, got {value!r} ({type(value).__name__})")


def _unknown(key: str) -> LowbitError:
    near = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return LowbitError(f"config: unknown key {key!r}" + (f" — did you mean {near[0]!r}?" if near else ""))


def apply_overrides(cfg: TrainConfig, values: dict, from_string: bool = False) -> TrainConfig:
    """Set keys from a mapping (a YAML file, flags); Axolotl's own spellings (``training/axolotl.py``) translate."""
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in _FIELDS and k in AXOLOTL_KEYS:
            apply_overrides(cfg, translate(k, value), from_string)
            continue
        if k not in _FIELDS:
            raise _unknown(key)
        if k == "optimizer" and isinstance(value, str):
            value = optimizer_name(value)
        setattr(cfg, k, _coerce(k, value, from_string))
    return cfg


def load_config(path: str | Path | None) -> TrainConfig:
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
    if not isinstance(data, dict):
        raise LowbitError(f"{p}: expected a mapping of keys to values")
    try:
        return apply_overrides(cfg, data)
    except LowbitError as e:
        raise LowbitError(f"{p}: {e}") from None


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


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
