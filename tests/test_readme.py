"""The README's Python examples run as written (slow: the real SmolLM2-135M), and do what they say."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_api_and_the_custom_loop_examples():
    blocks = _blocks()
    assert len(blocks) == 2
    assert "lowbit.train(cfg" in blocks[0] and "train_loop(" in blocks[1]


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    api, loop = _blocks()
    ns: dict = {}
    exec(compile(api, "README.md (API example)", "exec"), ns)
    assert round(ns["q"].bits_per_param, 3) == 4.127
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
    assert "paris" in capsys.readouterr().out.lower()
    res = ns["result"]
    assert res["steps"] == 3 and (tmp_path / "runs" / "readme" / "adapter_model.safetensors").exists()
    ns = {}
    exec(compile(loop, "README.md (custom loop example)", "exec"), ns)
    assert ns["state"].step == 10 and ns["after"] < ns["before"]
    assert (tmp_path / "my-loop-adapter" / "adapter_model.safetensors").exists()
