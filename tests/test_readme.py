"""The README's Python examples run as written (slow: the real SmolLM2-135M), and do what they say."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_api_the_custom_loop_the_reward_and_the_client_examples():
    blocks = _blocks()
    assert len(blocks) == 4
    assert "def bare_number(" in blocks[0] and "lowbit.train(cfg" in blocks[1] and "train_loop(" in blocks[2]
    assert "from openai import OpenAI" in blocks[3]


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _, api, loop, _ = _blocks()
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


def test_readme_grpo_example_runs(tmp_path, monkeypatch):
    """The GRPO config and its rewards.py, as written, for two steps (the README's run is 100)."""
    from lowbit.training.config import load_config
    from lowbit.training.recipe import train

    rewards = _blocks()[0]
    config = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S) if "rl: grpo" in b)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rewards.py").write_text(rewards)
    (tmp_path / "grpo.yaml").write_text(config)
    cfg = load_config(tmp_path / "grpo.yaml")
    cfg.max_steps = 2
    res = train(cfg, progress=False, log=lambda *a: None)
    assert res["steps"] == 2 and (tmp_path / "runs" / "grpo" / "adapter_model.safetensors").exists()
    rows = (tmp_path / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"rewards/bare_number/mean"' in rows[0] and '"rewards/exact_answer/mean"' in rows[0]
    assert (tmp_path / "runs" / "grpo" / "completions.jsonl").stat().st_size > 0


def test_readme_long_context_config_and_planner_levers_are_current(tmp_path, capsys):
    """The long-context config block is a valid config as written; the levers table is what `lowbit plan` prints."""
    from lowbit.cli import main
    from lowbit.training.config import load_config

    text = README.read_text()
    config = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "tiled_mlp" in b)
    (tmp_path / "long.yaml").write_text(config)
    cfg = load_config(tmp_path / "long.yaml").validate()
    assert cfg.tiled_mlp is True and cfg.sample_packing and cfg.datasets == "passkey-8k"
    assert cfg.model_config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0}
    at = text.index("longest sequence_len in 24GB")
    shown = text[at:text.index("```", at)]
    assert main(["plan", "llama-3.1-8b", "--micro-batch-size", "1", "--gpu-memory", "24GB", "--max-sequence-len"]) == 0
    printed = capsys.readouterr().out
    assert shown.strip() in printed, printed


def test_readme_client_example_runs_against_lowbit_serve(tmp_path, capsys):
    """The openai-client example, as written, against ``lowbit serve --model smollm2-135m --adapter demo=…`` (the
    demo's adapter stood in for by a random one; the port is the test's)."""
    import sys

    import torch

    from lowbit import cli
    from lowbit.cli.serve import make_server
    from lowbit.io.adapters import save_adapter
    from lowbit.io.loader import load
    from lowbit.nn.lora import add_lora
    from lowbit.serve.api import build_app

    sys.path.insert(0, str(Path(__file__).parent / "serve"))
    from servers import free_port, running

    from tiny import randomize_lora

    net = load("smollm2-135m", compute_dtype=torch.float32)
    add_lora(net, r=4, verbose=False)
    randomize_lora(net)
    save_adapter(net, tmp_path / "demo")
    del net
    port = free_port()
    args = cli.build_parser().parse_args(["serve", "--model", "smollm2-135m", "--adapter", f"demo={tmp_path / 'demo'}",
                                          "--compute-dtype", "float32", "--port", str(port)])
    example = _blocks()[3].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    with running(build_app(make_server(args)), port):
        exec(compile(example, "README.md (client example)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "['smollm2-135m', 'smollm2-135m:demo']"  # what the comment in the example says
    assert out[1].endswith(" 32") and len(out) >= 3


def test_readme_vision_config_and_data_format_train(tmp_path, monkeypatch):
    """The vision-language config block, as written but for its model folder (a tiny random Qwen2-VL here) and its
    data file (the README's record, with the picture it names), trains two steps and keeps the processor."""
    import json

    from PIL import Image
    from tiny_vlm import save_tiny_vlm

    from lowbit.training.config import load_config
    from lowbit.training.recipe import train

    text = README.read_text()
    config = next(b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "processor_type" in b)
    record = json.loads(next(b for b in re.findall(r"```json\n(.*?)```", text, re.S) if '"type": "image"' in b))
    monkeypatch.chdir(tmp_path)
    save_tiny_vlm(tmp_path / "Qwen2-VL-2B-Instruct", "qwen2_vl")
    (tmp_path / "data" / "images").mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "data" / "images" / "cat.png")
    (tmp_path / "data" / "train.jsonl").write_text((json.dumps(record) + "\n") * 16)
    (tmp_path / "vlm.yaml").write_text(config)
    cfg = load_config(tmp_path / "vlm.yaml")
    cfg.max_steps, cfg.compute_dtype = 2, "float32"
    res = train(cfg, progress=False, log=lambda *a: None)
    out = tmp_path / "outputs" / "vlm"
    assert res["steps"] == 2 and (out / "adapter_model.safetensors").exists()
    assert (out / "preprocessor_config.json").exists()
