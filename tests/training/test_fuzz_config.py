"""Fuzzed configs: any YAML text, any flag and value: a config, or a one-line error naming the file or key."""

from fuzzing import loads_or_says_where
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.training.config import TrainConfig, apply_overrides, load_config

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = st.sampled_from(["lora_r", "learning_rate", "quant_type", "datasets", "gradient_checkpointing", "blocksize",
                        "lora_target_modules", "max_steps", "no_such_key", "lora-r", ""])


@SETTINGS
@given(text=st.text(max_size=400) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_text_as_a_config_file(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    cfg = loads_or_says_where(lambda: load_config(path), str(path))
    if cfg is not None:
        loads_or_says_where(cfg.validate, "config:")


@SETTINGS
@given(values=st.dictionaries(KEYS, st.text(max_size=20), max_size=4))
def test_any_flags(values):
    cfg = TrainConfig()
    if loads_or_says_where(lambda: apply_overrides(cfg, values, from_string=True), "config:") is not None:
        loads_or_says_where(cfg.validate, "config:")
