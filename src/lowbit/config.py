"""Training configuration: one flat dataclass; YAML files and command-line flags set the same keys.

Key names follow Axolotl / LLaMA-Factory / mlx-lm. Unknown keys fail with a "did you mean" hint; values
of the wrong type fail naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .models import LowbitError

__all__ = ["TrainConfig", "load_config", "apply_overrides", "config_to_yaml"]


@dataclass
class TrainConfig:
    # model
    base_model: str = "smollm2-135m"
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: str = "auto"                 # auto | bfloat16 | float32
    trust_remote_code: bool = False
    # adapter
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0                   # 0 is fastest; 0.05–0.1 for small data sets
    lora_target_modules: typing.Union[str, list] = "all-linear"
    use_rslora: bool = False
    lora_init: str = "default"                  # default | loftq
    # data
    datasets: typing.Union[str, list] = "chatterbot"
    dataset_format: str = "auto"                # auto | text | completions | chat | alpaca
    val_set_size: float = 0.05
    sequence_len: int = 512
    train_on_inputs: bool = False
    sample_packing: bool = False
    # optimisation
    micro_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = 0                          # > 0 overrides num_epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"                # cosine | linear | constant
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"                    # adamw | adamw_8bit | paged_adamw | paged_adamw_8bit
    optimizer_budget_mb: float = 0.0            # paged optimizers: device bytes for state (0 = one page)
    gradient_checkpointing: bool = False
    # bookkeeping
    eval_steps: int = 50
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 1
    output_dir: str = "runs/lowbit"
    seed: int = 0
    tensorboard: bool = False

    def validate(self) -> "TrainConfig":
        def bad(key, why):
            raise LowbitError(f"config: {key} {why}")

        for k in ("lora_r", "micro_batch_size", "gradient_accumulation_steps", "sequence_len", "blocksize", "eval_steps",
                  "save_steps", "logging_steps"):
            if getattr(self, k) <= 0:
                bad(k, f"must be > 0, got {getattr(self, k)}")
        for k in ("learning_rate", "num_epochs"):
            if getattr(self, k) <= 0:
                bad(k, f"must be > 0, got {getattr(self, k)}")
        for k in ("max_steps", "warmup_steps", "weight_decay", "max_grad_norm", "lora_dropout", "val_set_size", "optimizer_budget_mb"):
            if getattr(self, k) < 0:
                bad(k, f"must be >= 0, got {getattr(self, k)}")
        choices = {"quant_type": ("nf4", "fp4", "int4", "nf3", "nf2"), "compute_dtype": ("auto", "bfloat16", "float32"),
                   "lora_init": ("default", "loftq"), "dataset_format": ("auto", "text", "completions", "chat", "alpaca"),
                   "lr_scheduler": ("cosine", "linear", "constant"),
                   "optimizer": ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")}
        for k, ok in choices.items():
            if getattr(self, k) not in ok:
                bad(k, f"must be one of {', '.join(ok)}, got {getattr(self, k)!r}")
        if self.lora_dropout >= 1:
            bad("lora_dropout", f"must be < 1, got {self.lora_dropout}")
        return self


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
    raise LowbitError(f"config: {key} expects {' or '.join(k.__name__ for k in kinds)}, got {value!r} ({type(value).__name__})")


def _unknown(key: str) -> LowbitError:
    near = difflib.get_close_matches(key, list(_FIELDS), n=1)
    return LowbitError(f"config: unknown key {key!r}" + (f" — did you mean {near[0]!r}?" if near else ""))


def apply_overrides(cfg: TrainConfig, values: dict, from_string: bool = False) -> TrainConfig:
    for key, value in values.items():
        k = key.replace("-", "_")
        if k not in _FIELDS:
            raise _unknown(key)
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
