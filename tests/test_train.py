"""The workflow end to end on a tiny model: CLI + config, the training loop, checkpoints, exact resume."""

import json
import math

import pytest
import torch

from lowbit import cli, train as train_mod
from lowbit.config import TrainConfig, apply_overrides, load_config
from lowbit.models import LowbitError
from tiny import save_tiny_with_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    model_dir = root / "model"
    save_tiny_with_tokenizer(model_dir)
    data = root / "data.jsonl"
    rows = []
    for i in range(48):
        rows.append({"messages": [{"role": "user", "content": f"what is the capital of france {i % 3}"},
                                  {"role": "assistant", "content": "the capital of france is paris"}]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, model_dir, data


def _cfg(setup, out, **kw):
    root, model_dir, data = setup
    base = dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
                micro_batch_size=4, sequence_len=64, max_steps=8, learning_rate=3e-3, warmup_steps=0,
                eval_steps=4, save_steps=4, val_set_size=8, output_dir=str(root / out), lora_dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


def test_config_keys_types_and_hints(tmp_path):
    cfg = TrainConfig()
    with pytest.raises(LowbitError, match="did you mean 'learning_rate'"):
        apply_overrides(cfg, {"learning_rat": 1})
    with pytest.raises(LowbitError, match="lora_r expects an integer"):
        apply_overrides(cfg, {"lora_r": "8"})
    with pytest.raises(LowbitError, match="gradient_checkpointing expects true/false"):
        apply_overrides(cfg, {"gradient_checkpointing": "maybe"}, from_string=True)
    p = tmp_path / "c.yaml"
    p.write_text("lora_r: 8\nlearning_rate: 1.0e-4\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(p)
    assert cfg.lora_r == 8 and cfg.learning_rate == 1e-4 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    p.write_text("lora_r: [\n")
    with pytest.raises(LowbitError, match="invalid YAML"):
        load_config(p)
    with pytest.raises(LowbitError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd").validate()


def test_cli_flags_override_yaml(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("lora_r: 8\nmicro_batch_size: 2\n")
    assert cli.main(["train", str(p), "--print-config", "--lora-r", "32", "--learning-rate=5e-5"]) == 0
    out = capsys.readouterr().out
    assert "lora_r: 32" in out and "micro_batch_size: 2" in out and "learning_rate: 5.0e-05" in out
    assert cli.main(["train", "--lora-rr", "3"]) == 2
    assert "did you mean 'lora_r'" in capsys.readouterr().err


def test_train_end_to_end_via_cli(setup, capsys):
    root, model_dir, data = setup
    out = root / "cli-run"
    rc = cli.main(["train", "--base-model", str(model_dir), "--datasets", str(data), "--compute-dtype", "float32",
                   "--lora-r", "4", "--micro-batch-size", "4", "--sequence-len", "64", "--max-steps", "12",
                   "--learning-rate", "3e-3", "--warmup-steps", "0", "--eval-steps", "6", "--save-steps", "6",
                   "--val-set-size", "8", "--output-dir", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (out / name).exists(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006", "step-0000012"]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in recs)
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    m = [l for l in text.splitlines() if l.startswith("eval loss:")][0]
    before, after = map(float, m.split(":")[1].split("->"))
    assert after < before and evals[-1] == pytest.approx(after, abs=1e-4)
    assert "lowbit generate --model" in text and "lowbit merge --model" in text
    # the saved adapter evaluates better than the base on the same data
    rc = cli.main(["eval", "--model", str(model_dir), "--adapter", str(out), "--data", str(data), "--json",
                   "--compute-dtype", "float32", "--sequence-len", "64"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    cli.main(["eval", "--model", str(model_dir), "--data", str(data), "--json", "--compute-dtype", "float32", "--sequence-len", "64"])
    assert json.loads(capsys.readouterr().out)["loss"] > res["loss"]
    # a second run into the same folder is refused
    assert cli.main(["train", "--base-model", str(model_dir), "--datasets", str(data), "--output-dir", str(out), "--quiet"]) == 2
    assert "already holds" in capsys.readouterr().err


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw_8bit"])
def test_resume_equals_uninterrupted(setup, monkeypatch, optimizer):
    full = train_mod.train(_cfg(setup, f"full-{optimizer}", optimizer=optimizer), progress=False, log=lambda *a: None)
    ref = [json.loads(l) for l in (setup[0] / f"full-{optimizer}" / "metrics.jsonl").read_text().splitlines()]

    # interrupt in the middle of step 6 (a Ctrl-C), then resume
    calls = {"n": 0}
    real = train_mod.lm_loss

    def flaky(model, batch, *a, **k):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
        return real(model, batch, *a, **k)

    monkeypatch.setattr(train_mod, "lm_loss", flaky)
    with pytest.raises(LowbitError, match="interrupted at step 5"):
        train_mod.train(_cfg(setup, f"resumed-{optimizer}", optimizer=optimizer), progress=False, log=lambda *a: None)
    monkeypatch.setattr(train_mod, "lm_loss", real)
    out = setup[0] / f"resumed-{optimizer}"
    assert (out / "checkpoints" / "step-0000005").exists()
    res = train_mod.train(_cfg(setup, f"resumed-{optimizer}", optimizer=optimizer), resume=True, progress=False,
                          log=lambda *a: None)
    got = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"])
    assert res["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)


def test_grad_accumulation_checkpointing_and_schedulers(setup):
    res = train_mod.train(_cfg(setup, "ga", gradient_accumulation_steps=2, micro_batch_size=2, gradient_checkpointing=True,
                               lr_scheduler="linear", max_steps=6, eval_steps=6, save_steps=6),
                          progress=False, log=lambda *a: None)
    assert res["eval_loss"] < res["base_eval_loss"]
    recs = [json.loads(l) for l in (setup[0] / "ga" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(3e-3)


def test_nonfinite_loss_stops_and_keeps_checkpoint(setup, monkeypatch):
    real = train_mod.lm_loss
    calls = {"n": 0}

    def boom(model, batch, *a, **k):
        s, n = real(model, batch, *a, **k)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 6:
                return s * float("nan"), n
        return s, n

    monkeypatch.setattr(train_mod, "lm_loss", boom)
    with pytest.raises(LowbitError, match=r"step 6: loss is nan.*step-0000004"):
        train_mod.train(_cfg(setup, "nan"), progress=False, log=lambda *a: None)
    assert (setup[0] / "nan" / "checkpoints" / "step-0000004" / "adapter_model.safetensors").exists()
    assert not (setup[0] / "nan" / "adapter_model.safetensors").exists()


def test_overwrite_replaces_run(setup):
    train_mod.train(_cfg(setup, "ow", max_steps=2, eval_steps=2, save_steps=2), progress=False, log=lambda *a: None)
    with pytest.raises(LowbitError, match="already holds"):
        train_mod.train(_cfg(setup, "ow", max_steps=2), progress=False, log=lambda *a: None)
    train_mod.train(_cfg(setup, "ow", max_steps=3, eval_steps=3, save_steps=3), overwrite=True, progress=False, log=lambda *a: None)
    assert sorted(p.name for p in (setup[0] / "ow" / "checkpoints").iterdir()) == ["step-0000003"]


def test_chunked_loss_matches_plain_cross_entropy(setup):
    from lowbit import models
    from lowbit.nn.lora import LoRALinear, add_lora

    root, model_dir, _ = setup
    m = models.load(model_dir, compute_dtype=torch.float32)
    add_lora(m, r=4, verbose=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LoRALinear):
                mod.lora_B.weight.normal_(0, 0.05)
    ids = torch.randint(0, 200, (3, 20), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    params = [p for p in m.parameters() if p.requires_grad]
    s, n = train_mod.lm_loss(m, batch, chunk_tokens=7)  # several chunks, the last one partial
    g1 = torch.autograd.grad(s, params)
    logits = m(input_ids=ids).logits[:, :-1].reshape(-1, m.config.vocab_size)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    g2 = torch.autograd.grad(ref, params)
    assert n == int((labels[:, 1:] != -100).sum())
    assert s.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
