"""Preference losses against TRL 1.16 (the oracle): the same tiny model, the same LoRA weights, the same batch, in
float32 — the loss and its gradient with respect to every LoRA factor agree to 1e-5 (relative)."""

import pytest
import torch

from lowbit.data.preference import preference_row
from lowbit.data.preference_batches import PreferenceBatches
from lowbit.data.records import Record
from lowbit.training.preference import PreferenceLoss
from lowbit.training.preference_spec import PreferenceSpec

PAIRS = [("what is the capital", " of france is paris", " hello"),
         ("hello how", " are you today", " the capital of"),
         ("below is an instruction", " that describes a task", " paris"),
         ("the answer is", " paris", " how are you today hello")]


class Table:
    """A preference token table in memory (what ``data/table.py`` reads from Arrow)."""

    def __init__(self, rows):
        self.rows = rows
        self.lengths = torch.tensor([len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                                     for r in rows]).numpy()

    def __len__(self):
        return len(self.rows)

    def row(self, k):
        return self.rows[k]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model folder, tokenizer, lowbit model with random LoRA weights — B ≠ 0)."""
    from tiny import tiny_with_random_lora

    path = tmp_path_factory.mktemp("pref-model")
    tok, mine = tiny_with_random_lora(path)
    return path, tok, mine


def _same_adapter(trainer, mine):
    """The trainer's new adapter (its reference: the adapter switched off, as lowbit's) set to lowbit's weights."""
    ours = dict(mine.named_parameters())
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_" in name:
                p.copy_(ours[_ours(name)])
    return trainer.model


def _ours(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


def _rows(tok, kto=False):
    rows = [preference_row(Record({"prompt": p, "chosen": c, "rejected": r}, f"pair{i}"), tok, "pairs", 64, {})
            for i, (p, c, r) in enumerate(PAIRS)]
    return rows


def _grads(model, names):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None and n in names}


def _compare(trl_loss, peft_model, mine, spec, batch):
    peft_model.zero_grad(set_to_none=True)
    mine.zero_grad(set_to_none=True)
    trl_loss.backward()
    theirs = {_ours(n): p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    s, units = PreferenceLoss(mine, spec)(batch)
    loss = s / units
    loss.backward()
    got = dict(mine.named_parameters())
    assert torch.allclose(loss, trl_loss.detach(), rtol=1e-5, atol=1e-7), (float(loss), float(trl_loss))
    assert len(theirs) == sum(1 for n, p in got.items() if p.requires_grad) > 0
    for n, g in theirs.items():  # relative to the gradient's size (float32 sums in another order differ by ~1e-7)
        assert (got[n].grad - g).norm() <= 1e-5 * g.norm(), (n, float((got[n].grad - g).norm() / g.norm()))


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def _base(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _dpo_trainer(path, tok, tmp_path, **kw):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                            "rejected": [r for _, _, r in PAIRS]})
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=64,
                     per_device_train_batch_size=len(PAIRS), **kw)
    return DPOTrainer(model=_base(path), args=args, train_dataset=ds, processing_class=tok, peft_config=_lora())


def test_tokenization_matches_trl(models, tmp_path):
    path, tok, _ = models
    tr = _dpo_trainer(path, tok, tmp_path, beta=0.1)
    for mine, theirs in zip(_rows(tok), tr.train_dataset):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert mine[k] == theirs[k], k


@pytest.mark.parametrize("loss_type,weights,smoothing", [
    (["sigmoid"], None, 0.0), (["hinge"], None, 0.0), (["ipo"], None, 0.0), (["robust"], None, 0.2),
    (["sigmoid", "ipo"], [0.7, 0.3], 0.0)])
def test_dpo_losses_and_gradients_equal_trl(models, tmp_path, loss_type, weights, smoothing):
    path, tok, mine = models
    beta = 0.3
    tr = _dpo_trainer(path, tok, tmp_path, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
                      **({"loss_weights": weights} if weights else {}))
    peft_model = _same_adapter(tr, mine)
    trl_batch = tr.data_collator([tr.train_dataset[i] for i in range(len(PAIRS))])
    trl_loss = tr.compute_loss(tr.model, trl_batch)
    spec = PreferenceSpec("dpo", beta, tuple(loss_type), tuple(weights or [1.0] * len(loss_type)), smoothing)
    batch = PreferenceBatches(Table(_rows(tok)), len(PAIRS), tok.pad_token_id, 64).batch(list(range(len(PAIRS))))
    _compare(trl_loss, peft_model, mine, spec, batch)


def _old_style_rows(trainer):
    """lowbit's rows from the token ids TRL's ORPO / CPO trainers made (their own tokenization: BOS + prompt, then
    each answer with EOS)."""
    rows = []
    for r in trainer.train_dataset:
        n = len(r["prompt_input_ids"])
        assert r["chosen_input_ids"][:n] == r["rejected_input_ids"][:n] == r["prompt_input_ids"]
        rows.append({"prompt_ids": r["prompt_input_ids"], "chosen_ids": r["chosen_input_ids"][n:],
                     "rejected_ids": r["rejected_input_ids"][n:], "label": True})
    return rows


def _pairs_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                              "rejected": [r for _, _, r in PAIRS]})


def test_orpo_loss_and_gradients_equal_trl(models, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    path, tok, mine = models
    args = ORPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=64, beta=0.25,
                      per_device_train_batch_size=len(PAIRS))
    tr = ORPOTrainer(model=_base(path), args=args, train_dataset=_pairs_dataset(), processing_class=tok,
                     peft_config=_lora())
    peft_model = _same_adapter(tr, mine)
    trl_loss = tr.get_batch_loss_metrics(peft_model, tr.data_collator(list(tr.train_dataset)), train_eval="train")[0]
    batch = PreferenceBatches(Table(_old_style_rows(tr)), len(PAIRS), tok.pad_token_id, 64).batch(
        list(range(len(PAIRS))))
    _compare(trl_loss, peft_model, mine, PreferenceSpec("orpo", orpo_alpha=0.25), batch)


@pytest.mark.parametrize("cpo_alpha,smoothing", [(0.0, 0.0), (0.5, 0.1)])
def test_simpo_loss_and_gradients_equal_trl_cpo(models, tmp_path, cpo_alpha, smoothing):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    path, tok, mine = models
    args = CPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=64, beta=2.0,
                     loss_type="simpo", simpo_gamma=0.7, cpo_alpha=cpo_alpha, label_smoothing=smoothing,
                     per_device_train_batch_size=len(PAIRS))
    tr = CPOTrainer(model=_base(path), args=args, train_dataset=_pairs_dataset(), processing_class=tok,
                    peft_config=_lora())
    peft_model = _same_adapter(tr, mine)
    trl_loss = tr.get_batch_loss_metrics(peft_model, tr.data_collator(list(tr.train_dataset)), train_eval="train")[0]
    batch = PreferenceBatches(Table(_old_style_rows(tr)), len(PAIRS), tok.pad_token_id, 64).batch(
        list(range(len(PAIRS))))
    spec = PreferenceSpec("simpo", beta=2.0, label_smoothing=smoothing, simpo_gamma=0.7, cpo_alpha=cpo_alpha)
    _compare(trl_loss, peft_model, mine, spec, batch)


def test_kto_loss_and_gradients_equal_trl(models, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    path, tok, mine = models
    examples = [(p, c, True) for p, c, _ in PAIRS[:3]] + [(p, r, False) for p, _, r in PAIRS[1:]]
    ds = Dataset.from_dict({"prompt": [p for p, _, _ in examples], "completion": [c for _, c, _ in examples],
                            "label": [lab for _, _, lab in examples]})
    args = KTOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, max_length=64, beta=0.5,
                     desirable_weight=0.8, undesirable_weight=1.3, per_device_train_batch_size=len(examples))
    tr = KTOTrainer(model=_base(path), args=args, train_dataset=ds, processing_class=tok, peft_config=_lora())
    peft_model = _same_adapter(tr, mine)
    trl_loss = tr.compute_loss(peft_model, tr.data_collator(list(tr.train_dataset)))
    rows = [preference_row(Record({"prompt": p, "completion": c, "label": lab}, f"ex{i}"), tok, "unpaired", 64, {})
            for i, (p, c, lab) in enumerate(examples)]
    for mine_row, theirs in zip(rows, tr.train_dataset):
        assert (mine_row["prompt_ids"], mine_row["chosen_ids"]) == (theirs["prompt_ids"], theirs["completion_ids"])
    batch = PreferenceBatches(Table(rows), len(rows), tok.pad_token_id, 64, kto=True).batch(list(range(len(rows))))
    spec = PreferenceSpec("kto", beta=0.5, desirable_weight=0.8, undesirable_weight=1.3)
    _compare(trl_loss, peft_model, mine, spec, batch)
