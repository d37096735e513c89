"""What a GRPO run computes (``rl: grpo``): Axolotl's ``trl:`` section read with TRL 1.16's defaults, and checked.

    trl:
      num_generations: 8          # completions per prompt (a group)
      max_completion_length: 512
      temperature: 1.0            # also divides the logits of the trained log-probs (as TRL does)
      top_p: 1.0
      top_k: 0                    # 0: off
      beta: 0.0                   # KL weight against the adapter-off reference (0: no reference pass)
      epsilon: 0.2                # clip range [1 − ε, 1 + ε_high]
      epsilon_high: null          # default ε
      loss_type: dapo             # grpo | bnpo | dr_grpo | dapo
      scale_rewards: group        # group | batch | none (true = group, false = none)
      num_iterations: 1
      reward_funcs: [rewards.correct]      # module.function, or a file beside the config: rewards.py
      reward_weights: [1.0]
      log_completions: false

``micro_batch_size`` counts completions (TRL's ``per_device_train_batch_size``): a step generates
``micro_batch_size × gradient_accumulation_steps × ranks`` completions, whole groups of ``num_generations``.
Held-out prompts (``val_set_size``, ``test_datasets``) are scored as the training ones: ``grpo.py``.
Importing this module does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.python_funcs import is_function_name
from .preference_spec import starts_at_base

__all__ = ["GRPOSpec", "GRPO_LOSS_TYPES", "SCALE_REWARDS", "grpo_spec_from", "validate_grpo", "GRPO_KEYS"]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
# the trl: keys a GRPO run reads
GRPO_KEYS = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "beta", "epsilon",
             "epsilon_high", "loss_type", "scale_rewards", "num_iterations", "reward_funcs", "reward_weights",
             "log_completions", "num_completions_to_print", "mask_truncated_completions")
# trl: keys that say where and how fast generation and scoring run (vLLM, a server, workers, kernels): lowbit
# samples in-process from the model being trained, so they change nothing it computes
IN_PROCESS = ("use_vllm", "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_mode",
              "vllm_gpu_memory_utilization", "vllm_tensor_parallel_size", "vllm_lora_sync", "vllm_sync_interval",
              "vllm_enable_sleep_mode", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
              "vllm_importance_sampling_cap", "use_data_producer", "async_prefetch", "prefetch_depth",
              "reward_num_workers", "use_liger_loss")
# trl: keys accepted at TRL's (or Axolotl's) default, which is what lowbit computes; another value is refused
AT_DEFAULT = {"importance_sampling_level": "token", "multi_objective_aggregation": "sum_then_normalize",
              "repetition_penalty": 1.0, "min_p": 0.0, "sync_ref_model": False, "ref_model_mixup_alpha": 0.9,
              "ref_model_sync_steps": 64, "use_bias_correction_kl": True, "replay_buffer_size": 0,
              "replay_recompute_logps": True, "reroll_start_fraction": 1.0, "reroll_max_groups": 1,
              "skip_zero_advantage_batches": True, "top_entropy_quantile": 1.0}


@dataclass(frozen=True)
class GRPOSpec:
    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    reward_funcs: tuple = ()
    reward_weights: tuple = ()
    log_completions: bool = False
    mask_truncated_completions: bool = False
    seed: int = 0


def _scale(v) -> str:
    return {True: "group", False: "none", None: "group"}.get(v, v) if isinstance(v, (bool, type(None))) else v


def grpo_spec_from(cfg) -> GRPOSpec:
    """The run's ``GRPOSpec`` (``cfg``: a validated ``TrainConfig`` with ``rl: grpo``)."""
    t = cfg.trl or {}
    eps = float(t.get("epsilon", 0.2))
    funcs = tuple(t.get("reward_funcs") or ())
    return GRPOSpec(int(t.get("num_generations", 8)), int(t.get("max_completion_length", 512)),
                    float(t.get("temperature", 1.0)), float(t.get("top_p", 1.0)), int(t.get("top_k") or 0),
                    float(t.get("beta") or cfg.rl_beta or 0.0), eps,
                    float(t["epsilon_high"]) if t.get("epsilon_high") is not None else eps,
                    t.get("loss_type") or "dapo", _scale(t.get("scale_rewards")), funcs,
                    tuple(float(w) for w in t.get("reward_weights") or [1.0] * len(funcs)),
                    bool(t.get("log_completions")), bool(t.get("mask_truncated_completions")), cfg.seed)


def _number(t: dict, key: str, bad, low: float, high: float = float("inf"), whole: bool = False) -> None:
    v = t.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (whole and not float(v).is_integer()) or \
            not low <= v <= high:
        bad(f"trl.{key}:", f"must be {'a whole number' if whole else 'a number'} in [{low}, {high}], got {v!r}")


def validate_grpo(cfg, bad) -> None:
    """The ``trl:`` keys and batch shape of an ``rl: grpo`` config; ``bad(key, why)`` raises its one-line error."""
    t = cfg.trl or {}
    for k, v in t.items():
        if k in GRPO_KEYS or k in IN_PROCESS or v in (None, "", [], {}) or (v is False and k not in AT_DEFAULT):
            continue
        if k in AT_DEFAULT:
            if v != AT_DEFAULT[k]:
                bad(f"trl.{k}:", f"{v!r} is not built in; lowbit's GRPO computes {k} = {AT_DEFAULT[k]!r} (TRL's "
                    "default)")
            continue
        bad(f"trl.{k}:", f"is not read by lowbit's GRPO (it reads {', '.join(GRPO_KEYS)})")
    if not t.get("reward_funcs"):
        bad("trl.reward_funcs:", "rl: grpo needs at least one reward function (module.function, e.g. "
            "lowbit.rewards.exact_answer)")
    funcs = t["reward_funcs"] if isinstance(t["reward_funcs"], list) else [t["reward_funcs"]]
    for f in funcs:
        if not is_function_name(f):
            bad("trl.reward_funcs:", f"each entry is module.function (or file.py:function), got {f!r}")
    w = t.get("reward_weights")
    if w is not None and (not isinstance(w, list) or len(w) != len(funcs) or
                          not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)):
        bad("trl.reward_weights:", f"needs one number per reward function ({len(funcs)}), got {w!r}")
    _number(t, "num_generations", bad, 2, 4096, whole=True)
    _number(t, "max_completion_length", bad, 1, 1 << 20, whole=True)
    _number(t, "temperature", bad, 1e-6, 100)
    _number(t, "top_p", bad, 1e-6, 1)
    _number(t, "top_k", bad, 0, 1 << 24, whole=True)
    _number(t, "beta", bad, 0, 1e6)
    if (t.get("beta") or cfg.rl_beta) and not starts_at_base(cfg):
        bad("trl.beta:", "> 0 needs a run that starts from the base: its KL reference is the base with the adapters "
            "switched off, not this start (lora_model_dir, LoftQ, modules trained whole); use beta: 0 (TRL's "
            "default) or merge the starting adapter into the base first")
    _number(t, "epsilon", bad, 0, 1e3)
    _number(t, "epsilon_high", bad, 0, 1e3)
    if t.get("loss_type") is not None and t["loss_type"] not in GRPO_LOSS_TYPES:
        bad("trl.loss_type:", f"must be one of {', '.join(GRPO_LOSS_TYPES)}, got {t['loss_type']!r}")
    if _scale(t.get("scale_rewards")) not in SCALE_REWARDS:
        bad("trl.scale_rewards:", f"must be one of {', '.join(SCALE_REWARDS)}, got {t['scale_rewards']!r}")
    if t.get("num_iterations") not in (None, 1):
        bad("trl.num_iterations:", f"{t['num_iterations']!r}: lowbit generates for every step (1, TRL's default); "
            "reusing a generation for several steps is not built in")
    g = int(t.get("num_generations", 8))
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps
    if per_step % g:
        bad("micro_batch_size", f"× gradient_accumulation_steps ({per_step} completions a step) must be a multiple "
            f"of trl.num_generations ({g}): a step holds whole groups")
    for key, why in (("sample_packing", "completions are generated per prompt"),
                     ("train_on_inputs", "only the completions are scored")):
        if getattr(cfg, key):
            bad(f"{key}:", f"true cannot be used with rl: grpo ({why})")
    if cfg.quant_calibration != "none":
        bad("quant_calibration:", f"{cfg.quant_calibration} calibrates on supervised data: calibrate in the SFT "
            "run and start this one from its base")
    if cfg.train_quant_scales:
        bad("train_quant_scales:", "true would move the reference model of rl: grpo with the policy (the reference "
            "is the base without the adapter); train the scales in the SFT run")
    _check_sources(cfg, bad)


def _check_sources(cfg, bad) -> None:
    """GRPO reads prompts: a source's ``type`` is left out (its records hold a prompt field) or names the user's
    transform (Axolotl's ``type: rewards.prompt_transform``)."""
    from ..data.sources import PYTHON_TYPE, parse_sources
    from ..errors import LowbitError

    try:
        sources = parse_sources(cfg.datasets, cfg.dataset_format, custom=True)
    except LowbitError:
        return  # reported by the config's own check
    for s in sources:
        if s.fmt != "auto" and not s.fmt.startswith(PYTHON_TYPE):
            bad(f"{s.label or 'datasets'}.type:", f"{s.fmt} — rl: grpo reads prompts (records with a prompt field: "
                "text or chat messages, and the columns the rewards read); leave type out, or name your transform "
                "(module.function)")
