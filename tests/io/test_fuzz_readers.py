"""Fuzzed checkpoint, adapter and model-config files: each reads, or is refused in one line naming the file."""

import json
import struct

from fuzzing import file_bytes, json_values, loads_or_says_where
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit.io.adapters import read_adapter
from lowbit.io.safetensors import read_header
from lowbit.jsonfile import read_object
from lowbit.planner.catalog import load_model_config

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=file_bytes | json_values.map(lambda v: (lambda h: struct.pack("<Q", len(h)) + h)(json.dumps(v).encode())))
def test_any_bytes_as_safetensors(tmp_path, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    loads_or_says_where(lambda: read_header(path), str(path))


@SETTINGS
@given(config=json_values.map(json.dumps) | st.text(max_size=100), weights=file_bytes)
def test_any_adapter_folder(tmp_path, config, weights):
    (tmp_path / "adapter_config.json").write_text(config, encoding="utf-8", errors="surrogatepass")
    (tmp_path / "adapter_model.safetensors").write_bytes(weights)
    loads_or_says_where(lambda: read_adapter(tmp_path), str(tmp_path))


@SETTINGS
@given(data=file_bytes)
def test_any_bytes_as_a_json_state_file(tmp_path, data):
    path = tmp_path / "trainer_state.json"
    path.write_bytes(data)
    loads_or_says_where(lambda: read_object(path), str(path))
    (tmp_path / "config.json").write_bytes(data)
    loads_or_says_where(lambda: load_model_config(str(tmp_path)), str(tmp_path))
