"""The loop handed parts built in Python: a transformers model, lowbit's 4-bit layers and LoRA, plain batches.
Ctrl-C and a non-finite loss go through the state object."""

import math

import pytest
import torch

from lowbit.nn.linear import Linear4bit
from lowbit.nn.lora import add_lora
from lowbit.training.callbacks import Callback
from lowbit.training.loop import NonFiniteLoss, train_loop
from lowbit.training.state import TrainState

from tiny import tiny_config


def _model():
    """A tiny LLaMA built in Python (not loaded by lowbit), its linear layers made 4-bit by hand."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with torch.no_grad():  # larger-than-init weights, as tiny.save_tiny, so the outputs are not ~uniform
        for w in net.parameters():
            if w.dim() == 2:
                w.normal_(0, 0.08)
    for name, mod in list(net.named_modules()):
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, Linear4bit.from_linear(mod))
    add_lora(net, r=4, alpha=8, verbose=False)
    return net


def _batches(n=6):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


class Recorder(Callback):
    def __init__(self):
        self.records, self.ended = [], False

    def on_step_end(self, state, record):
        self.records.append(record)

    def on_train_end(self, state):
        self.ended = True


def test_loop_trains_a_model_built_in_python():
    net, rec = _model(), Recorder()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    state = train_loop(net, opt, _batches(), steps=30, accumulation=2, callbacks=[rec])
    losses = [r["loss"] for r in rec.records]
    assert state.step == 30 and len(losses) == 30 and rec.ended
    assert state.epoch == 9 and state.pos == 6  # 6 batches, 2 per step: a new epoch every 3 steps
    assert losses[-1] < 0.8 * losses[0]


class GradCapture(torch.optim.SGD):
    """SGD with lr 0 that keeps a copy of the gradients it was handed."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for g in self.param_groups for p in g["params"]]


def test_accumulation_equals_one_big_batch():
    """2 micro-batches of 2 rows accumulated == 1 batch of 4 rows (loss normalised by the group's tokens)."""
    small = _batches(2)
    small[1]["labels"][:, :9] = -100  # the two micro-batches hold different numbers of learned tokens
    big = [{k: torch.cat([small[0][k], small[1][k]]) for k in small[0]}]
    runs = []
    for batches, acc in ((small, 2), (big, 1)):
        net, rec = _model(), Recorder()
        opt = GradCapture([p for p in net.parameters() if p.requires_grad], lr=0.0)
        train_loop(net, opt, batches, steps=1, accumulation=acc, max_grad_norm=0, callbacks=[rec])
        runs.append((rec.records[0]["loss"], opt.grads))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ctrl_c_rolls_the_state_back_to_the_step_start():
    net = _model()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    calls = {"n": 0}

    def loss_fn(model, batch):
        from lowbit.training.loss import lm_loss

        calls["n"] += 1
        if calls["n"] == 4:  # the second micro-batch of step 2
            raise KeyboardInterrupt
        return lm_loss(model, batch)

    state = TrainState()
    with pytest.raises(KeyboardInterrupt):
        train_loop(net, opt, _batches(), steps=5, accumulation=2, state=state, loss_fn=loss_fn)
    assert (state.step, state.epoch, state.pos) == (1, 0, 2), "back at the start of step 2"
    assert all(p.grad is None for p in net.parameters() if p.requires_grad), "the half step's gradients are dropped"


def test_nonfinite_loss_stops_before_the_update():
    net = _model()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in net.parameters() if p.requires_grad]

    def nan_loss(model, batch):
        from lowbit.training.loss import lm_loss

        s, n = lm_loss(model, batch)
        return s * math.nan, n

    with pytest.raises(NonFiniteLoss, match="step 1: loss is nan"):
        train_loop(net, opt, _batches(), steps=3, loss_fn=nan_loss)
    after = [p.detach() for p in net.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
