"""The optimizer and schedule keys Axolotl configs carry (warmup_ratio, Adam's betas and epsilon, the schedulers and
their shapes, LoRA+ and embedding learning rates) and the ways a run stops early (early stopping, the loss
watchdog)."""

import json
import math

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.training import recipe
from lowbit.training.config import TrainConfig
from lowbit.training.schedule import lr_lambda, warmup_steps


def test_schedules():
    f = lr_lambda("cosine", 4, 20, min_ratio=0.1)
    assert [round(f(s), 4) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # warmup (step + 1) / (w + 1)
    assert f(4) == 1.0 and f(20) == pytest.approx(0.1) and f(12) == pytest.approx(0.1 + 0.9 * 0.5)
    q = lr_lambda("cosine", 4, 20, quadratic=True)
    assert q(1) == pytest.approx(0.4 ** 2)
    c = lr_lambda("cosine", 2, 20, min_ratio=0.2, constant_ratio=0.5)  # decay to the minimum by step 10, then hold
    assert c(10) == pytest.approx(0.2) and c(15) == pytest.approx(0.2) and c(6) == pytest.approx(0.6)
    assert lr_lambda("constant", 5, 20)(0) == 1.0  # transformers' "constant": no warmup
    w = lr_lambda("constant_with_warmup", 5, 20)
    assert w(0) == pytest.approx(1 / 6) and w(10) == 1.0
    assert warmup_steps(10, 0.1, 95) == 9 and warmup_steps(10, 0.0, 95) == 10  # ⌊ratio × total⌋ as Axolotl
    with pytest.raises(LowbitError, match="lr_scheduler must be one of"):
        lr_lambda("rex", 0, 10)


def _cfg(setup, out, **kw):
    _, model, data = setup
    base = dict(base_model=str(model), datasets=str(data), compute_dtype="float32", lora_r=4, micro_batch_size=4,
                sequence_len=64, max_steps=10, learning_rate=1e-2, warmup_steps=0, eval_steps=2, save_steps=2,
                val_set_size=8, output_dir=str(out))
    base.update(kw)
    return TrainConfig(**base)


def test_optimizer_keys_reach_the_optimizer(setup, tmp_path):
    from lowbit.training.optimizer import make_optimizer

    cfg = _cfg(setup, tmp_path / "x", adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-5, loraplus_lr_ratio=16,
               lora_modules_to_save=["embed_tokens"], embedding_lr=1e-3, warmup_ratio=0.25, weight_decay=0.1,
               optimizer="adamw_8bit")
    net = recipe.load_model(cfg, torch.float32, lambda *a: None)
    opt, sched = make_optimizer(cfg, net, 20)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"default", "lora_B", "embeddings"}
    assert groups["lora_B"]["initial_lr"] == pytest.approx(0.16) and groups["embeddings"]["initial_lr"] == 1e-3
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-5 and g["weight_decay"] == 0.1 for g in opt.param_groups)
    assert sched.lr_lambdas[0](0) == pytest.approx(1 / 6)  # warmup_ratio 0.25 of 20 steps: 5 warmup steps


def test_early_stopping_ends_the_run_and_saves_the_adapter(setup, tmp_path):
    said = []
    # a rate this tiny model overshoots with: its eval loss stops improving well before 40 steps (at 0.5 it slid down
    # a plateau by ~1e-4 an evaluation once the chunked loss's gradient rounding changed)
    res = recipe.train(_cfg(setup, tmp_path / "run", learning_rate=1.0, max_steps=40, early_stopping_patience=2),
                       progress=False, log=said.append)
    assert res["steps"] < 40 and "early stopping: eval loss" in res["stop_reason"]
    evals = [json.loads(line)["eval_loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert min(evals) < evals[-1] and min(evals) < min(evals[-2:])  # the last two evaluations found no new best
    assert (tmp_path / "run" / "adapter_model.safetensors").exists() and any("early stopping" in s for s in said)


def test_loss_watchdog_stops_a_blown_up_run_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(LowbitError, match=r"loss watchdog: the loss stayed above 0.01 for 3 steps .*Last good "
                                          r"checkpoint: .*step-0000002$") as e:
        recipe.train(_cfg(setup, out, loss_watchdog_threshold=0.01, loss_watchdog_patience=3), progress=False,
                     log=lambda *a: None)
    assert "\n" not in str(e.value) and not (out / "adapter_model.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-0000002"]


def test_neftune_adds_noise_in_training_only(setup, tmp_path):
    cfg = _cfg(setup, tmp_path / "x", neftune_noise_alpha=5.0)
    net = recipe.load_model(cfg, torch.float32, lambda *a: None)
    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    emb = net.get_input_embeddings()
    net.eval()
    clean = emb(ids)
    net.train()
    noisy = emb(ids)
    bound = 5.0 / math.sqrt(16 * clean.shape[-1])
    assert 0 < (noisy - clean).abs().max() <= bound + 1e-6
    net.eval()
    assert torch.equal(emb(ids), clean)
