"""Preference runs through ``lowbit.train``: the reference, metrics, resume, and the run's result in merge."""

import json

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.training import recipe
from lowbit.training.config import TrainConfig


@pytest.fixture(scope="module")
def pairs(setup, tmp_path_factory):
    """A file of 48 conversational pairs: the right answer against an unrelated one."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"what is the capital of france {i % 3}"}],
             "chosen": [{"role": "assistant", "content": "the capital of france is paris"}],
             "rejected": [{"role": "assistant", "content": "hello how are you today"}]} for i in range(48)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(setup, data, out, **kw):
    root, model_dir, _ = setup
    base = dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
                micro_batch_size=4, sequence_len=64, max_steps=8, learning_rate=5e-3, warmup_steps=0, eval_steps=4,
                save_steps=4, val_set_size=8, output_dir=str(root / out), rl="dpo")
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_preference_and_resumes_exactly(setup, pairs):
    logs = []
    full = recipe.train(_cfg(setup, pairs, "dpo-full"), progress=False, log=logs.append)
    assert any("reference: the 4-bit base with the adapters switched off" in str(m) for m in logs)
    assert any("40 train / 8 valid pairs" in str(m) for m in logs)
    assert full["base_eval_loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy = reference: −log σ(0)
    assert full["eval_loss"] < 0.6
    rows = _metrics(setup[0] / "dpo-full")
    assert rows[-1]["eval_rewards/accuracies"] == 1.0 and rows[-1]["eval_rewards/margins"] > 0
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(rows[0])

    from tiny import InterruptAt

    with pytest.raises(LowbitError, match="interrupted at step 5"):
        recipe.train(_cfg(setup, pairs, "dpo-resumed"), progress=False, log=lambda *a: None,
                     callbacks=[InterruptAt(5)])
    recipe.train(_cfg(setup, pairs, "dpo-resumed"), resume=True, progress=False, log=lambda *a: None)
    got = _metrics(setup[0] / "dpo-resumed")
    assert [r["step"] for r in got] == list(range(1, 9))
    for a, b in zip(got, rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), a["step"]
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-7)


def test_precomputed_reference_equals_switching_adapters_off(setup, pairs):
    a = recipe.train(_cfg(setup, pairs, "ref-off", max_steps=4), progress=False, log=lambda *a: None)
    logs = []
    b = recipe.train(_cfg(setup, pairs, "ref-pre", max_steps=4, precompute_ref_log_probs=True), progress=False,
                     log=logs.append)
    assert any("log-probs precomputed (precompute_ref_log_probs)" in str(m) for m in logs)
    assert (setup[0] / "ref-pre" / "reference_logps.safetensors").exists()
    for x, y in zip(_metrics(setup[0] / "ref-off"), _metrics(setup[0] / "ref-pre")):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5, abs=1e-7)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)


def test_an_sft_adapter_is_the_frozen_reference(setup, pairs):
    """Starting from an adapter, the first step's loss is log 2: policy and reference are the same model."""
    sft = recipe.train(_cfg(setup, setup[2], "sft-start", rl="", max_steps=3), progress=False, log=lambda *a: None)
    logs = []
    res = recipe.train(_cfg(setup, pairs, "dpo-from-sft", lora_model_dir=sft["output_dir"], max_steps=4),
                       progress=False, log=logs.append)
    assert any("the model does not start from the base" in str(m) for m in logs)
    assert res["base_eval_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert _metrics(setup[0] / "dpo-from-sft")[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)


@pytest.mark.parametrize("rl,extra", [("ipo", {}), ("orpo", {"orpo_alpha": 0.2}), ("simpo", {"rl_beta": 2.0}),
                                      ("kto", {})])
def test_every_method_trains_and_improves_held_out_accuracy(setup, pairs, rl, extra):
    res = recipe.train(_cfg(setup, pairs, f"m-{rl}", rl=rl, **extra), progress=False, log=lambda *a: None)
    rows = _metrics(setup[0] / f"m-{rl}")
    assert res["eval_loss"] < res["base_eval_loss"]
    assert rows[-1]["eval_rewards/chosen"] > rows[-1]["eval_rewards/rejected"]


def test_merge_and_generate_work_on_the_result(setup, pairs):
    from lowbit import cli

    out = setup[0] / "dpo-full"
    if not (out / "adapter_model.safetensors").exists():
        recipe.train(_cfg(setup, pairs, "dpo-full"), progress=False, log=lambda *a: None)
    assert cli.main(["merge", "--model", str(setup[1]), "--adapter", str(out), "--out", str(setup[0] / "dpo-merged"),
                     "--dtype", "fp32"]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(setup[0] / "dpo-merged", dtype=torch.float32)
    assert merged(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("kw,match", [
    ({"sample_packing": True}, "sample_packing: true cannot be used with rl: dpo"),
    ({"rl": "kto", "micro_batch_size": 1}, "at least 2 with rl: kto"),
    ({"rl": ""}, "preference data .pairs. needs rl"),
])
def test_refusals_are_one_line(setup, pairs, kw, match):
    cfg = _cfg(setup, pairs, "refused", **kw)
    if not kw.get("rl", "x"):  # a supervised run on preference data: the entry names the type
        cfg.datasets = [{"path": str(pairs), "type": "pairs"}]
    with pytest.raises(LowbitError, match=match):
        recipe.train(cfg, progress=False, log=lambda *a: None)


def test_supervised_data_under_rl_names_the_problem(setup):
    cfg = _cfg(setup, setup[2], "refused-sft")
    with pytest.raises(LowbitError, match="not preference data"):
        recipe.train(cfg, progress=False, log=lambda *a: None)


def test_compiled_layers_give_the_same_preference_run(setup, pairs):
    from tiny import runs_compiled_layers

    for c in (False, True):
        _, ran = runs_compiled_layers(lambda: recipe.train(_cfg(setup, pairs, f"dpo-compile-{c}", compile=c,
                                                                max_steps=3), progress=False, log=lambda *a: None))
        assert ran == c
    eager, compiled = (_metrics(setup[0] / f"dpo-compile-{c}") for c in (False, True))
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
