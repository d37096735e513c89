"""The training config: keys, types, hints, registries."""


import pytest
import yaml

from lowbit.errors import LowbitError
from lowbit.training.config import TrainConfig, apply_overrides, config_changes, config_to_yaml, load_config


def test_config_keys_types_and_hints(tmp_path):
    cfg = TrainConfig()
    with pytest.raises(LowbitError, match="did you mean 'learning_rate'"):
        apply_overrides(cfg, {"learning_rat": 1})
    with pytest.raises(LowbitError, match="lora_r expects an integer"):
        apply_overrides(cfg, {"lora_r": "eight"})
    with pytest.raises(LowbitError, match="gradient_checkpointing must be one of false, true, offload"):
        apply_overrides(cfg, {"gradient_checkpointing": "maybe"}, from_string=True).validate()
    for value, want in (("auto", "auto"), ("AUTO", "auto"), ("true", True), ("false", False)):
        assert apply_overrides(TrainConfig(), {"tiled_mlp": value}, from_string=True).validate().tiled_mlp == want
    with pytest.raises(LowbitError, match="tiled_mlp must be one of false, true, auto, got 'sometimes'"):
        apply_overrides(TrainConfig(), {"tiled_mlp": "sometimes"}, from_string=True).validate()
    with pytest.raises(LowbitError, match="tiled_mlp_num_shards must be >= 0"):
        TrainConfig(tiled_mlp_num_shards=-1).validate()
    with pytest.raises(LowbitError, match="double_quant expects true/false"):
        apply_overrides(TrainConfig(), {"double_quant": "maybe"}, from_string=True)
    p = tmp_path / "c.yaml"
    p.write_text("lora_r: 8\nlearning_rate: 1.0e-4\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(p)
    assert cfg.lora_r == 8 and cfg.learning_rate == 1e-4 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    p.write_text("lora_r: [\n")
    with pytest.raises(LowbitError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(LowbitError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd").validate()


def test_unknown_names_are_errors_everywhere():
    from lowbit.training.schedule import lr_lambda

    with pytest.raises(LowbitError, match="lr_scheduler must be one of cosine, linear, constant, "
                                          "constant_with_warmup, got 'cosin'"):
        TrainConfig(lr_scheduler="cosin").validate()
    with pytest.raises(LowbitError, match="lr_scheduler must be one of"):
        lr_lambda("cosin", 0, 10)
    with pytest.raises(LowbitError, match="blocksize must be a power of two"):
        TrainConfig(blocksize=48).validate()
    with pytest.raises(LowbitError, match="compute_dtype must be one of"):
        TrainConfig(compute_dtype="fp8").validate()


def test_config_changes_split_math_from_harmless():
    from dataclasses import asdict

    old = TrainConfig()
    new = TrainConfig(lora_r=32, datasets="chitchat", max_steps=10, logging_steps=5)
    math_changes, harmless = config_changes(asdict(old), new)
    assert math_changes == ["lora_r: 16 -> 32", "datasets: 'chatterbot' -> 'chitchat'"]
    assert harmless == ["max_steps: 0 -> 10", "logging_steps: 1 -> 5"]
    saved = asdict(old)
    del saved["seed"]  # a checkpoint from an older version, without a newer key: its default is assumed
    assert config_changes(saved, old) == ([], [])


@pytest.mark.parametrize("keys", [{}, {"warmup_ratio": 0.1, "lr_scheduler": "linear"}, {"warmup_steps": 0},
                                  {"compile": "auto", "gradient_checkpointing": "offload", "lora_r": 32}])
def test_a_runs_config_yaml_loads_back_as_the_same_config(tmp_path, keys):
    """config.yaml (what a run writes, and --print-config prints) is a config file lowbit reads back unchanged."""
    cfg = apply_overrides(TrainConfig(base_model="m", datasets="d.jsonl"), keys)
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and config_changes(yaml.safe_load(config_to_yaml(cfg)), again) == ([], [])


def test_warmup_steps_with_a_zero_ratio_is_not_both():
    cfg = apply_overrides(TrainConfig(), {"warmup_steps": 7, "warmup_ratio": 0.0})
    assert (cfg.warmup_steps, cfg.warmup_ratio) == (7, 0.0)
    with pytest.raises(LowbitError, match="both set"):
        apply_overrides(TrainConfig(), {"warmup-steps": "7", "warmup-ratio": "0.05"}, from_string=True)


@pytest.mark.parametrize("text", ["? \n", "1: 2\n", "true: 1\n"])
def test_keys_that_are_not_names_are_one_line_errors(tmp_path, text):
    """YAML makes None, number and boolean keys (found by tests/training/test_fuzz_config.py: `?`)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(LowbitError, match=r"c\.yaml: expected a mapping of names"):
        load_config(path)
