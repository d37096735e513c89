"""train_quant_scales: the base's block scales train with the adapter (codes frozen), are saved beside it in
quant_scales.safetensors (peft's file keeps LoRA only), come back with the adapter (generate/eval), fold into a
merged model, resume exactly from a checkpoint, and are refused where they cannot work."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import LowbitError
from lowbit.io.adapters import load_adapter, read_adapter, save_adapter
from lowbit.io.loader import load
from lowbit.io.merging import merge
from lowbit.io.quant_scales import PREFIX, SCALES_FILE
from lowbit.nn.linear import Linear4bit
from lowbit.nn.lora import add_lora
from lowbit.training import recipe
from lowbit.training.config import TrainConfig

from tiny import ctrl_c_in_loss


def _cfg(setup, out, **kw):
    root, model_dir, data = setup
    return TrainConfig(**{**dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4,
                                 lora_alpha=8, micro_batch_size=4, sequence_len=64, max_steps=6, learning_rate=3e-3,
                                 warmup_steps=0, eval_steps=3, save_steps=3, val_set_size=8,
                                 output_dir=str(root / out), quant_type="nf3", train_quant_scales=True), **kw})


def _codes(net):
    return {n.removesuffix(".base"): m.codes.clone() for n, m in net.named_modules() if isinstance(m, Linear4bit)}


def test_scales_train_and_go_where_the_adapter_goes(setup, tmp_path):
    logs = []
    res = recipe.train(_cfg(setup, "qs"), progress=False, log=logs.append)
    out, model = setup[0] / "qs", res["model"].eval()
    assert any("the block scales of 14 4-bit layers trained (codes frozen)" in s for s in logs)
    assert any("quant_scales.safetensors: lowbit generate" in s for s in logs)
    assert res["eval_loss"] < res["base_eval_loss"]
    scales = load_file(str(out / SCALES_FILE))
    assert len(scales) == 14 and all(t.abs().sum() > 0 for t in scales.values())
    peft_file = load_file(str(out / "adapter_model.safetensors"))
    assert all(".lora_A." in k or ".lora_B." in k for k in peft_file)  # what peft and vLLM read: LoRA only
    plain = load(setup[1], _cfg(setup, "x").quant_spec(), compute_dtype=torch.float32)
    assert all(torch.equal(c, _codes(model)[n]) for n, c in _codes(plain).items())

    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        back = load_adapter(load(setup[1], _cfg(setup, "x").quant_spec(), compute_dtype=torch.float32), out).eval()
        assert torch.allclose(back(input_ids=ids).logits, want, atol=1e-5)
        lora_only = tmp_path / "lora-only"
        shutil.copytree(out, lora_only, ignore=shutil.ignore_patterns(SCALES_FILE, "checkpoints"))
        bare = load_adapter(load(setup[1], _cfg(setup, "x").quant_spec(), compute_dtype=torch.float32), lora_only)
        assert not torch.allclose(bare.eval()(input_ids=ids).logits, want, atol=1e-3)  # the scales matter
    merge(back, tmp_path / "merged", dtype=torch.float32)
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)


def test_resume_equals_uninterrupted(setup, monkeypatch):
    recipe.train(_cfg(setup, "qs-full"), progress=False, log=lambda *a: None)
    ref = [json.loads(r) for r in (setup[0] / "qs-full" / "metrics.jsonl").read_text().splitlines()]
    with ctrl_c_in_loss(monkeypatch, 5), pytest.raises(LowbitError, match="interrupted at step 4"):
        recipe.train(_cfg(setup, "qs-resumed"), progress=False, log=lambda *a: None)
    recipe.train(_cfg(setup, "qs-resumed"), resume=True, progress=False, log=lambda *a: None)
    got = [json.loads(r) for r in (setup[0] / "qs-resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
    full, resumed = (read_adapter(setup[0] / d)[1] for d in ("qs-full", "qs-resumed"))
    assert {k for k in full if k.startswith(PREFIX)} and full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6)


def test_an_adapter_without_scales_replaces_one_with_them(setup, tmp_path):
    net = load(setup[1], _cfg(setup, "x").quant_spec(), compute_dtype=torch.float32)
    add_lora(net, r=4, alpha=8, target_modules="all-linear")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("")  # a run's folder: the adapter's files are replaced one by one
    from lowbit.nn.block_scales import train_block_scales

    train_block_scales(net)
    save_adapter(net, folder)
    assert (folder / SCALES_FILE).is_file()
    for m in net.modules():
        if isinstance(m, Linear4bit):
            m.scale_log = None
    save_adapter(net, folder)
    assert not (folder / SCALES_FILE).exists() and (folder / "metrics.jsonl").exists()


@pytest.mark.parametrize("kw,msg", [
    ({"load_in_4bit": False}, "train_quant_scales needs load_in_4bit: true"),
    ({"rl": "dpo", "datasets": None}, "train_quant_scales: true would move the reference model of rl: dpo"),
])
def test_refused_where_it_cannot_work(setup, kw, msg):
    with pytest.raises(LowbitError, match=msg):
        _cfg(setup, "bad", **kw).validate()


def test_refused_under_torchrun(setup, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LowbitError, match="train_quant_scales: not built under torchrun yet"):
        recipe.load_model(_cfg(setup, "tr"), torch.float32, lambda *a: None)


def test_serve_refuses_an_adapter_that_moves_the_shared_base(setup):
    from lowbit.serve.adapters import AdapterBank

    out = setup[0] / "qs-serve"
    recipe.train(_cfg(setup, "qs-serve", max_steps=1), progress=False, log=lambda *a: None)
    bank = AdapterBank(load(setup[1], _cfg(setup, "x").quant_spec(), compute_dtype=torch.float32), str(setup[1]))
    with pytest.raises(LowbitError, match=r"trains more than LoRA layers \(lowbit_quant_scales\..*lowbit merge"):
        bank.add("scaled", out)
