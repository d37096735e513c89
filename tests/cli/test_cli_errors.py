"""No traceback reaches a user: every command, given bad arguments or bad files, answers in one line
(``error: …``) and a non-zero status; an unexpected failure says to run with --debug, which shows it."""

import json
import subprocess
import sys

import pytest

from lowbit import cli


@pytest.fixture(scope="module")
def bad(tmp_path_factory, setup):
    """A folder of broken inputs."""
    root = tmp_path_factory.mktemp("bad")
    (root / "bad.yaml").write_text("lora_r: [\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "notutf8.jsonl").write_bytes(b"\xff\xfe garbage\n")
    (root / "empty").mkdir()
    fake = root / "fake-model"
    fake.mkdir()
    (fake / "config.json").write_text("{not json")
    trunc = root / "trunc-model"  # the tiny model with its weights cut short
    trunc.mkdir()
    for f in setup[1].iterdir():
        data = f.read_bytes()
        (trunc / f.name).write_bytes(data[:5000] if f.suffix == ".safetensors" else data)
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('["not", "an", "object"]')
    (root / "model.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    return root


def _cases(bad, setup):
    _, model, data = setup
    m = ["--model", str(model)]
    return [
        (["train", str(bad / "bad.yaml")], "bad.yaml:2: invalid YAML"),
        (["train", str(bad / "list.yaml")], "expected a mapping"),
        (["train", "--lora-r", "many"], "lora_r expects an integer"),
        (["train", "--lora-rr", "3"], "did you mean"),
        (["train", "--quant-type", "nf5"], "invalid choice"),
        (["train", "--base-model", str(bad / "fake-model"), "--datasets", str(data), "--output-dir",
          str(bad / "o1")], "config.json: invalid JSON"),
        (["train", "--base-model", str(model), "--datasets", str(bad / "notutf8.jsonl"), "--output-dir",
          str(bad / "o2")], "not UTF-8"),
        (["train", "--base-model", str(model), "--datasets", str(data), "--lora-target-modules", "no_such_proj",
          "--output-dir", str(bad / "o3")], "no linear layer named 'no_such_proj'"),
        (["train", "--base-model", str(bad / "trunc-model"), "--datasets", str(data), "--output-dir",
          str(bad / "o4")], "corrupt"),
        (["plan", "no-such-family"], "unknown model"),
        (["plan", "llama-65b", "--gpu-memory", "48XB"], "cannot read memory size"),
        (["plan", "llama-65b", "--max-sequence-len"], "need --gpu-memory"),
        (["eval", *m, "--datasets", str(bad / "missing.jsonl")], "data not found"),
        (["eval", *m], "required"),
        (["generate", "--model", str(bad / "empty"), "--prompt", "x"], "no config.json"),
        (["generate", "--model", str(bad / "model.gguf"), "--prompt", "x"], "model.gguf"),
        (["merge", *m, "--adapter", str(bad / "adapter"), "--out", str(bad / "m")], "expected a JSON object"),
        (["merge", *m, "--adapter", str(bad / "nowhere"), "--out", str(bad / "m")], "no adapter_config.json"),
        (["merge", *m, "--adapter", str(model), "--out", str(bad / "m"), "--dtype", "fp8"], "--dtype must be"),
        (["quantize", "--model", str(bad / "trunc-model"), "--out", str(bad / "q")], "corrupt"),
        (["quantize", *m, "--out", str(bad / "q"), "--blocksize", "48"], "blocksize must be a power of two"),
        (["demo", "--steps", "x"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
    ]


def test_every_command_answers_bad_input_in_one_line(bad, setup, capsys):
    for argv, expected in _cases(bad, setup):
        rc = cli.main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (argv, rc, err)
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, (argv, err)
        assert expected in err, (argv, expected, err)


def test_unexpected_errors_say_debug_and_debug_shows_the_traceback(monkeypatch, capsys):
    from lowbit.cli import plan

    def boom(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(plan, "run", boom)
    assert cli.main(["plan", "llama-65b"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: unexpected ZeroDivisionError: division by zero (run with --debug for the traceback)"
    with pytest.raises(ZeroDivisionError):
        cli.main(["plan", "llama-65b", "--debug"])
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["plan", "llama-65b"])


def test_the_real_entry_point_prints_one_line(bad):
    """What a shell sees from `python -m lowbit`: one line on stderr, status 2."""
    p = subprocess.run([sys.executable, "-m", "lowbit", "train", str(bad / "bad.yaml")], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "invalid YAML" in p.stderr, p.stderr


def test_no_file_is_ever_unpickled():
    """No pickle, no torch.load without weights_only=True, anywhere in the package."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src" / "lowbit"
    hits = []
    for f in src.rglob("*.py"):
        text = f.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M):
            hits.append(f"{f.name}: imports pickle")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                hits.append(f"{f.name}: {call}")
    assert not hits, hits
    assert json.loads('{"ok": true}')["ok"]  # (json, not pickle, is how lowbit stores structured state)
