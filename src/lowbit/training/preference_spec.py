"""What a preference run computes: the method (the config's ``rl``) and its constants, read from the config with
TRL's defaults where a key is absent. The losses themselves: ``preference_loss.py``. Importing this module does not
import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.preference import is_preference_format
from ..data.sources import parse_sources
from ..errors import LowbitError

__all__ = ["PreferenceSpec", "METHODS", "DPO_LOSS_TYPES", "PAIRED", "spec_from", "validate_preference",
           "starts_at_base"]

METHODS = ("dpo", "ipo", "orpo", "kto", "simpo")     # the config's rl: values
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
PAIRED = ("dpo", "ipo", "orpo", "simpo")


@dataclass(frozen=True)
class PreferenceSpec:
    method: str                                 # METHODS (ipo: dpo with the ipo loss type)
    beta: float = 0.1
    loss_types: tuple = ("sigmoid",)
    loss_weights: tuple = (1.0,)
    label_smoothing: float = 0.0
    orpo_alpha: float = 0.1
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dpo", "ipo", "kto")

    @property
    def paired(self) -> bool:
        return self.method in PAIRED


def starts_at_base(cfg) -> bool:
    """Whether the model as training starts computes what the base alone does (so adapters off = the start)."""
    return not (cfg.lora_model_dir or cfg.lora_init != "default" or cfg.lora_modules_to_save
                or cfg.unfrozen_parameters)


def spec_from(cfg) -> PreferenceSpec:
    """The run's ``PreferenceSpec`` (``cfg``: a validated ``TrainConfig`` with ``rl`` set). β: ``trl.beta``, else
    ``rl_beta``, else 0.1; ``rl: ipo`` is DPO with the ipo loss; ORPO's α: ``orpo_alpha``, else β."""
    beta = (cfg.trl or {}).get("beta") or cfg.rl_beta or 0.1
    types = cfg.dpo_loss_type if isinstance(cfg.dpo_loss_type, list) else [cfg.dpo_loss_type or "sigmoid"]
    if cfg.rl == "ipo":
        types = ["ipo"]
    weights = tuple(float(w) for w in cfg.dpo_loss_weights) if cfg.dpo_loss_weights else (1.0,) * len(types)
    alpha = float(cfg.orpo_alpha if cfg.orpo_alpha is not None else beta)
    return PreferenceSpec(cfg.rl, float(beta), tuple(types), weights, cfg.dpo_label_smoothing, alpha, cfg.simpo_gamma,
                          cfg.cpo_alpha, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)


def validate_preference(cfg, bad) -> None:
    """The preference keys of ``cfg`` (a ``TrainConfig``), and data whose kind (pairs or not) matches ``rl``;
    ``bad(key, why)`` raises the config's one-line error. Under ``rl`` Axolotl's ``type: chat_template`` is its
    ``chat_template.default``."""
    if cfg.rl == "grpo":
        from .grpo_spec import validate_grpo

        validate_grpo(cfg, bad)
        return
    if cfg.rl in ("gdpo", "ebft"):
        bad("rl:", f"{cfg.rl} is not built in; lowbit trains {', '.join(METHODS)} and grpo")
    try:
        kinds = {is_preference_format(src.fmt) or bool(cfg.rl and src.fmt == "chat")
                 for src in parse_sources(cfg.datasets, cfg.dataset_format) if src.fmt != "auto"}
    except LowbitError:
        kinds = set()  # reported below
    if not cfg.rl:
        if True in kinds:
            bad("datasets:", "preference data (pairs) needs rl: dpo, ipo, orpo, kto or simpo")
        return
    if False in kinds:
        bad("datasets:", f"rl: {cfg.rl} trains on preference data; a supervised type is given (use pairs, "
            "chat_template.default, chat_template.argilla, chatml.intel, … see the README)")
    if cfg.train_on_inputs:
        bad("train_on_inputs:", f"true has no meaning with rl: {cfg.rl} (the completions are compared; ORPO and SimPO "
            "learn the chosen ones)")
    if cfg.sample_packing:
        bad("sample_packing:", f"true cannot be used with rl: {cfg.rl} (each pair is one row per completion)")
    if cfg.quant_calibration != "none":
        bad("quant_calibration:", f"{cfg.quant_calibration} calibrates on supervised data: calibrate in the SFT "
            "run and start this one from its base (base_model: that run's base/)")
    if cfg.train_quant_scales:
        bad("train_quant_scales:", f"true would move the reference model of rl: {cfg.rl} with the policy (the "
            "reference is the base without the adapter); train the scales in the SFT run")
    types = cfg.dpo_loss_type if isinstance(cfg.dpo_loss_type, list) else \
        [cfg.dpo_loss_type] if cfg.dpo_loss_type else []
    if types and cfg.rl not in ("dpo", "ipo"):
        bad("dpo_loss_type", f"applies to rl: dpo, not {cfg.rl}")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            bad("dpo_loss_type", f"must be one of {', '.join(DPO_LOSS_TYPES)} (or a list of them), got {t!r}")
    if cfg.dpo_loss_weights is not None and len(cfg.dpo_loss_weights) != max(1, len(types)):
        bad("dpo_loss_weights", f"needs one weight per dpo_loss_type ({max(1, len(types))}), got "
            f"{cfg.dpo_loss_weights!r}")
    if not 0 <= cfg.dpo_label_smoothing < 0.5:
        bad("dpo_label_smoothing", f"must be in [0, 0.5), got {cfg.dpo_label_smoothing}")
    if cfg.dpo_label_smoothing and cfg.rl in ("dpo", "ipo") and "robust" not in types:
        bad("dpo_label_smoothing", "smooths the robust loss only (as TRL 1.16 does): add dpo_loss_type: robust")
    for k, v in (cfg.trl or {}).items():
        if k != "beta" and v not in (None, False, "", [], {}):
            bad(f"trl.{k}:", "only trl.beta is read (online generation and rewards are not built in)")
    if cfg.rl == "kto":
        if cfg.micro_batch_size < 2:
            bad("micro_batch_size", "must be at least 2 with rl: kto (its KL term pairs each prompt with another "
                "example's completion in the batch)")
        if cfg.precompute_ref_log_probs:
            bad("precompute_ref_log_probs:", "true cannot be used with rl: kto (its mismatched pairs change with "
                "every batch)")
