"""Every key of Axolotl's config schema is honoured, taken as an implementation choice, or refused in one line; values
are read as Axolotl reads them (null is the default, 2e-5 is a number)."""

from pathlib import Path

import pytest
import yaml

from lowbit.errors import LowbitError
from lowbit.training.axolotl import TRANSLATIONS, Report, is_axolotl_key
from lowbit.training.axolotl_keys import CHOICES, UNSUPPORTED
from lowbit.training.config import TrainConfig, apply_overrides, load_config

SCHEMA = [k for k in (Path(__file__).with_name("axolotl_schema_keys.txt").read_text().splitlines())
          if k and not k.startswith("#")]
FIELDS = set(TrainConfig.__dataclass_fields__)


def test_every_schema_key_is_classified():
    assert len(SCHEMA) > 450
    unknown = [k for k in SCHEMA if k not in FIELDS and not is_axolotl_key(k)]
    assert not unknown, unknown
    # one class each: lowbit's own, translated, an implementation choice or not built in
    kinds = [{k in FIELDS, k in TRANSLATIONS, k in CHOICES, k in UNSUPPORTED} for k in SCHEMA]
    assert all(sum(x) <= 1 for x in kinds)


@pytest.mark.parametrize("key", SCHEMA)
def test_null_is_the_default_for_every_key(key):
    cfg = apply_overrides(TrainConfig(), {key: None})
    assert cfg == TrainConfig(), key


@pytest.mark.parametrize("key", sorted(UNSUPPORTED))
def test_a_feature_lowbit_lacks_is_refused_in_one_line_when_set(key):
    why, default = UNSUPPORTED[key]
    if default is not None:
        apply_overrides(TrainConfig(), {key: default})  # Axolotl's own default means "unset"
    with pytest.raises(LowbitError) as e:
        apply_overrides(TrainConfig(), {key: "something"})
    msg = str(e.value)
    assert msg.startswith(f"config: {key}: 'something' — ") and why in msg and "\n" not in msg


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_an_implementation_choice_is_accepted_and_reported(key):
    report = Report()
    assert apply_overrides(TrainConfig(), {key: True}, report=report) == TrainConfig()
    assert report.choices == [f"{key} ({CHOICES[key]})"]


def test_values_as_axolotl_reads_them(tmp_path):
    p = tmp_path / "c.yml"
    p.write_text("learning_rate: 2e-5\nwarmup_ratio: 1.0e-1\nevals_per_epoch:\nsample_packing:\nlora_r: '8'\n"
                 "lora_dropout: 0\ngradient_checkpointing: 'True'\nweight_decay: 1e-2\nnum_epochs: 3\n"
                 "max_grad_norm:\nseed: 42.0\ntrain_on_inputs: yes\n")
    assert yaml.safe_load(p.read_text())["learning_rate"] == "2e-5"  # YAML 1.1: a string
    cfg = load_config(p).validate()
    assert cfg.learning_rate == 2e-5 and cfg.warmup_ratio == 0.1 and cfg.weight_decay == 0.01
    assert cfg.evals_per_epoch == 0 and cfg.sample_packing is False and cfg.max_grad_norm == 1.0  # null: default
    assert cfg.lora_r == 8 and cfg.lora_dropout == 0.0 and cfg.gradient_checkpointing is True and cfg.seed == 42
    assert cfg.train_on_inputs is True and cfg.num_epochs == 3.0
    with pytest.raises(LowbitError, match="seed expects an integer, got 4.5"):
        apply_overrides(TrainConfig(), {"seed": 4.5})


def test_translations_and_their_report(tmp_path):
    report = Report()
    cfg = apply_overrides(TrainConfig(), {
        "adapter": "lora", "load_in_8bit": True, "lora_target_linear": True, "lora_target_modules": ["q_proj"],
        "bf16": "auto", "optimizer": "adamw_torch_4bit", "use_tensorboard": True, "peft_use_rslora": True,
        "bnb_config_kwargs": {"bnb_4bit_use_double_quant": False},
        "eval_strategy": "epoch", "save_strategy": "no", "gpu_memory_limit": 20, "noisy_embedding_alpha": 5,
        "fsdp": ["full_shard", "auto_wrap"], "fsdp_config": {"activation_checkpointing": True},
        "micro_batch_size": 2, "batch_size": 8, "rope_scaling": {"type": "linear", "factor": 2.0},
        "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"]}, report=report).validate()
    assert (cfg.load_in_8bit, cfg.load_in_4bit) == (True, False)  # lora + load_in_8bit: an 8-bit base
    assert cfg.lora_target_modules == "all-linear"  # lora_target_linear adds every linear layer to the names
    assert (cfg.compute_dtype, cfg.optimizer, cfg.tensorboard, cfg.use_rslora) == ("auto", "adamw_8bit", True, True)
    assert (cfg.double_quant, cfg.evals_per_epoch, cfg.save_steps) == (False, 1, 0)
    assert (cfg.memory_limit, cfg.neftune_noise_alpha, cfg.distributed) == ("20GB", 5.0, "fsdp")
    assert cfg.gradient_checkpointing is True and cfg.gradient_accumulation_steps == 4
    assert cfg.model_config == {"rope_scaling": {"type": "linear", "factor": 2.0}}
    assert any(t.startswith("adapter: lora → load_in_4bit: false") for t in report.translated)
    assert any("adamw_torch_4bit" in c and "2 bytes per LoRA parameter" in c for c in report.choices)
    assert any(c.startswith("plugins: cut_cross_entropy") for c in report.choices)
    assert "Axolotl keys translated: " in report.lines()[0]


def test_loftq_config_and_its_bits():
    cfg = apply_overrides(TrainConfig(), {"adapter": "qlora", "peft": {"loftq_config": {"loftq_bits": 4}}}).validate()
    assert cfg.lora_init == "loftq"
    with pytest.raises(LowbitError, match="loftq_bits: 2 — LoftQ starts from the 4-bit base"):
        apply_overrides(TrainConfig(), {"peft": {"loftq_config": {"loftq_bits": 2}}})
    with pytest.raises(LowbitError, match="lora_init: loftq needs a 4-bit"):
        apply_overrides(TrainConfig(), {"load_in_8bit": True, "lora_init": "loftq"}).validate()


def test_lowbit_key_wins_over_a_translation():
    cfg = apply_overrides(TrainConfig(), {"adapter": "lora", "load_in_4bit": True})  # Axolotl's 4-bit LoRA
    assert cfg.load_in_4bit is True
    cfg = apply_overrides(TrainConfig(), {"load_in_4bit": True, "adapter": "lora"})  # order does not matter
    assert cfg.load_in_4bit is True


def test_print_config_shows_the_effective_config_and_plan_reads_the_same_file(tmp_path, capsys):
    from lowbit import cli

    p = tmp_path / "ax.yml"
    p.write_text("base_model: smollm2-135m\nadapter: qlora\nlora_r: 8\nlearning_rate: 2e-5\nwarmup_ratio: 0.1\n"
                 "attn_implementation: flash_attention_2\nsample_packing:\nsequence_len: 1024\nmicro_batch_size: 2\n"
                 "gradient_checkpointing: true\noptimizer: adamw_bnb_8bit\n")
    assert cli.main(["train", str(p), "--print-config"]) == 0
    out = capsys.readouterr()
    eff = yaml.safe_load(out.out)
    assert eff["learning_rate"] == 2e-5 and eff["warmup_ratio"] == 0.1 and eff["optimizer"] == "adamw_8bit"
    assert "attn_implementation (lowbit runs attention with PyTorch" in out.err
    assert cli.main(["plan", str(p), "--gpu-memory", "8GB"]) == 0
    assert "fits in" in capsys.readouterr().out
