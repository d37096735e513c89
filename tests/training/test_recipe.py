"""train(cfg) end to end on a tiny model: exact resume, accumulation, NaN stop, overwrite."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.training import loss as loss_mod
from lowbit.training import recipe
from lowbit.training.config import TrainConfig

from tiny import ctrl_c_in_loss


def _cfg(setup, out, **kw):
    root, model_dir, data = setup
    base = dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
                micro_batch_size=4, sequence_len=64, max_steps=8, learning_rate=3e-3, warmup_steps=0,
                eval_steps=4, save_steps=4, val_set_size=8, output_dir=str(root / out), lora_dropout=0.1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("optimizer,packing", [("adamw", False), ("paged_adamw_8bit", False), ("adamw", True)])
def test_resume_equals_uninterrupted(setup, monkeypatch, optimizer, packing):
    run = f"{optimizer}{'-packed' if packing else ''}"
    full = recipe.train(_cfg(setup, f"full-{run}", optimizer=optimizer, sample_packing=packing), progress=False,
                        log=lambda *a: None)
    ref = [json.loads(row) for row in (setup[0] / f"full-{run}" / "metrics.jsonl").read_text().splitlines()]

    # interrupt in the middle of step 6 (a Ctrl-C), then resume
    with ctrl_c_in_loss(monkeypatch, 6), pytest.raises(LowbitError, match="interrupted at step 5"):
        recipe.train(_cfg(setup, f"resumed-{run}", optimizer=optimizer, sample_packing=packing), progress=False,
                     log=lambda *a: None)
    out = setup[0] / f"resumed-{run}"
    assert (out / "checkpoints" / "step-0000005").exists()
    res = recipe.train(_cfg(setup, f"resumed-{run}", optimizer=optimizer, sample_packing=packing), resume=True,
                       progress=False, log=lambda *a: None)
    got = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"])
    assert res["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)


def test_grad_accumulation_checkpointing_and_schedulers(setup):
    res = recipe.train(_cfg(setup, "ga", gradient_accumulation_steps=2, micro_batch_size=2,
                            gradient_checkpointing=True,
                               lr_scheduler="linear", max_steps=6, eval_steps=6, save_steps=6),
                          progress=False, log=lambda *a: None)
    assert res["eval_loss"] < res["base_eval_loss"]
    recs = [json.loads(row) for row in (setup[0] / "ga" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in recs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == pytest.approx(3e-3)


def test_nonfinite_loss_stops_and_keeps_checkpoint(setup, monkeypatch):
    real = loss_mod.lm_loss
    calls = {"n": 0}

    def boom(model, batch, *a, **k):
        s, n = real(model, batch, *a, **k)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 6:
                return s * float("nan"), n
        return s, n

    monkeypatch.setattr(loss_mod, "lm_loss", boom)
    with pytest.raises(LowbitError, match=r"step 6: loss is nan.*step-0000004"):
        recipe.train(_cfg(setup, "nan"), progress=False, log=lambda *a: None)
    assert (setup[0] / "nan" / "checkpoints" / "step-0000004" / "adapter_model.safetensors").exists()
    assert not (setup[0] / "nan" / "adapter_model.safetensors").exists()


def test_overwrite_replaces_run(setup):
    recipe.train(_cfg(setup, "ow", max_steps=2, eval_steps=2, save_steps=2), progress=False, log=lambda *a: None)
    with pytest.raises(LowbitError, match="already holds"):
        recipe.train(_cfg(setup, "ow", max_steps=2), progress=False, log=lambda *a: None)
    recipe.train(_cfg(setup, "ow", max_steps=3, eval_steps=3, save_steps=3), overwrite=True, progress=False,
                 log=lambda *a: None)
    assert sorted(p.name for p in (setup[0] / "ow" / "checkpoints").iterdir()) == ["step-0000003"]


def test_resume_refuses_a_config_that_changes_the_math_and_reports_harmless_changes(setup):
    recipe.train(_cfg(setup, "rc", max_steps=4, eval_steps=4, save_steps=2), progress=False, log=lambda *a: None)
    out = setup[0] / "rc"
    before = (out / "config.yaml").read_text()
    with pytest.raises(LowbitError, match=r"cannot resume.*lora_r: 4 -> 8.*sequence_len: 64 -> 32"):
        recipe.train(_cfg(setup, "rc", max_steps=6, lora_r=8, sequence_len=32), resume=True, progress=False,
                     log=lambda *a: None)
    assert (out / "config.yaml").read_text() == before, "a refused resume writes nothing"
    said = []
    res = recipe.train(_cfg(setup, "rc", max_steps=6, eval_steps=3, save_steps=2), resume=True, progress=False,
                       log=said.append)
    assert res["steps"] == 6
    assert any("max_steps: 4 -> 6" in s and "eval_steps: 4 -> 3" in s for s in said), said
    assert "max_steps: 6" in (out / "config.yaml").read_text()


def test_tiled_mlp_and_rope_scaling_train_the_same_run(setup):
    """The long-context levers through train(): packed rows, checkpointing, the MLP tiled in 3 shards — the same
    losses step by step as the whole MLP (float tolerance), the loss going down; a rope_scaling override lands in the
    adapter's header."""
    from lowbit.io.adapters import adapter_config_overrides

    kw = dict(sample_packing=True, sequence_len=256, micro_batch_size=1, gradient_checkpointing=True,
              lora_dropout=0.0, max_steps=6, eval_steps=6, save_steps=6,
              model_config={"rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    logs = []
    whole = recipe.train(_cfg(setup, "whole", **kw), progress=False, log=lambda *a: None)
    tiled = recipe.train(_cfg(setup, "tiled", tiled_mlp=True, tiled_mlp_num_shards=3, **kw), progress=False,
                         log=logs.append)
    assert any("tiled_mlp: 2 MLP blocks" in str(x) for x in logs)
    losses = {run: [json.loads(r)["loss"] for r in (setup[0] / run / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(r)] for run in ("whole", "tiled")}
    assert len(losses["tiled"]) == 6
    assert losses["tiled"] == pytest.approx(losses["whole"], rel=1e-4)
    assert tiled["eval_loss"] < tiled["base_eval_loss"] and tiled["eval_loss"] == pytest.approx(whole["eval_loss"],
                                                                                                rel=1e-4)
    assert adapter_config_overrides(setup[0] / "tiled") == kw["model_config"]


@pytest.mark.parametrize("extra", [{}, {"tiled_mlp": True, "tiled_mlp_num_shards": 3}])
def test_compiled_layers_train_the_same_run(setup, extra):
    """compile: true through train() — packed rows, checkpointing (and the tiled MLP): the same losses step by step
    as the eager layers (float tolerance), and the compile is reported."""
    kw = dict(sample_packing=True, sequence_len=256, micro_batch_size=1, gradient_checkpointing=True,
              lora_dropout=0.0, max_steps=4, eval_steps=4, save_steps=4, **extra)
    runs = [f"{how}{len(extra)}" for how in ("eager", "compiled")]
    eager = recipe.train(_cfg(setup, runs[0], compile=False, **kw), progress=False, log=lambda *a: None)
    from tiny import runs_compiled_layers

    logs = []
    compiled, ran = runs_compiled_layers(
        lambda: recipe.train(_cfg(setup, runs[1], compile=True, **kw), progress=False, log=logs.append))
    assert ran and any("compile: 2 decoder layers through torch.compile" in str(x) for x in logs)
    assert any(str(x).startswith("compile: the first step took") for x in logs)
    eager_losses, compiled_losses = ([json.loads(r)["loss"] for r in (setup[0] / run / "metrics.jsonl").read_text()
                                      .splitlines()] for run in runs)
    assert len(compiled_losses) == 4 and compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert compiled["eval_loss"] == pytest.approx(eager["eval_loss"], rel=1e-4)


def test_packed_rows_refuse_lora_on_a_mamba_out_proj_and_train_without_it(setup, tmp_path):
    """GraniteMoeHybrid's Mamba layers read out_proj's weight themselves when training packed rows (no cache): LoRA
    there is refused in one line before training; without it the packed run trains."""
    from tiny import save_tiny_with_tokenizer

    save_tiny_with_tokenizer(tmp_path / "model", "granitemoehybrid")
    kw = dict(base_model=str(tmp_path / "model"), sample_packing=True, max_steps=2, eval_steps=2, save_steps=2,
              lora_dropout=0.0)
    with pytest.raises(LowbitError, match=r"^sample_packing: model\.layers\.0\.mamba\.out_proj carries LoRA"):
        recipe.train(_cfg(setup, "mamba-all", **kw), progress=False, log=lambda *a: None)
    res = recipe.train(_cfg(setup, "mamba-some", lora_target_modules=["in_proj", "q_proj", "k_proj", "v_proj",
                                                                       "o_proj"], **kw),
                       progress=False, log=lambda *a: None)
    assert res["steps"] == 2
