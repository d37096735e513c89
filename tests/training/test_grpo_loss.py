"""GRPO against TRL 1.16 (the oracle): ``GRPOTrainer._compute_loss`` on a fixed batch (prompt and completion ids,
masks, advantages, reference log-probs) with the same tiny model and LoRA weights, in float32 — the loss and the
gradient of every LoRA factor agree to 1e-5 (relative) for each loss type, with and without β and ε_high; and the
advantages from the same rewards equal TRL's for each ``scale_rewards``.

The prompts share one length: TRL left-pads prompts and runs its log-prob pass without position ids, so a padded
prompt's tokens sit at shifted positions there; lowbit numbers positions from each row's first real token (as
sampling does)."""

import pytest
import torch

from lowbit.training.distributed import World
from lowbit.training.grpo import GRPOLoss
from lowbit.training.grpo_loss import advantages
from lowbit.training.grpo_spec import GRPOSpec

PROMPTS = ["what is the capital", "hello how are you", "the answer is paris", "below is an instruction"]
COMPLETIONS = [" of france is paris", " today", " the capital of france is", " that describes"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import tiny_with_random_lora

    path = tmp_path_factory.mktemp("grpo-model")
    tok, mine = tiny_with_random_lora(path)
    return path, tok, mine


def _trainer(path, tok, tmp_path, **kw):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, num_generations=2,
                      per_device_train_batch_size=4, max_completion_length=12, **kw)
    ds = Dataset.from_dict({"prompt": PROMPTS})
    tr = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                     reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args, train_dataset=ds,
                     processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    tr.current_gradient_accumulation_steps = 1
    return tr


def _rows(tok):
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    n = min(len(p) for p in prompts)
    prompts = [p[:n] for p in prompts]  # one length (see the module docstring)
    comps = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in COMPLETIONS]
    return prompts, comps


def _trl_inputs(prompts, comps, adv, pad):
    width = max(len(c) for c in comps)
    cids = torch.full((len(comps), width), pad, dtype=torch.long)
    cmask = torch.zeros((len(comps), width), dtype=torch.long)
    for i, c in enumerate(comps):
        cids[i, : len(c)] = torch.tensor(c)
        cmask[i, : len(c)] = 1
    out = {"prompt_ids": torch.tensor(prompts), "prompt_mask": torch.ones(len(prompts), len(prompts[0]),
                                                                           dtype=torch.long),
           "completion_ids": cids, "completion_mask": cmask, "advantages": adv,
           "num_items_in_batch": cmask.sum()}
    return out


def _ours(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default", "")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta,eps_high", [(0.0, None), (0.04, 0.28)])
def test_loss_and_gradients_equal_trl(models, tmp_path, loss_type, beta, eps_high):
    path, tok, mine = models
    tr = _trainer(path, tok, tmp_path, loss_type=loss_type, beta=beta, epsilon=0.2, temperature=0.7,
                  **({"epsilon_high": eps_high} if eps_high else {}))
    ours = dict(mine.named_parameters())
    with torch.no_grad():
        for name, p in tr.model.named_parameters():
            if "lora_" in name:
                p.copy_(ours[_ours(name)])
    prompts, comps = _rows(tok)
    adv = torch.tensor([1.2, -0.7, 0.3, -0.8])
    spec = GRPOSpec(num_generations=2, max_completion_length=12, temperature=0.7, beta=beta, epsilon=0.2,
                    epsilon_high=eps_high or 0.2, loss_type=loss_type)
    module = GRPOLoss(mine, spec, tok, [], [tok.eos_token_id], World(), 4)
    batch = module._micro_batch([(p, c, False) for p, c in zip(prompts, comps)], adv)
    inputs = _trl_inputs(prompts, comps, adv, tok.pad_token_id)
    if beta:  # TRL's reference: its peft model with the adapter off; lowbit's: adapters_disabled, inside the loss
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        with torch.no_grad(), tr.model.disable_adapter():
            inputs["ref_per_token_logps"] = tr._get_per_token_logps_and_entropies(
                tr.model, ids, torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                inputs["completion_ids"].shape[1])[0]
    mine.zero_grad(set_to_none=True)
    tr.model.zero_grad(set_to_none=True)
    theirs_loss = tr._compute_loss(tr.model, inputs)
    theirs_loss.backward()
    s, units = module(batch)
    loss = s / units
    loss.backward()
    assert torch.allclose(loss, theirs_loss.detach(), rtol=1e-5, atol=1e-7), (float(loss), float(theirs_loss))
    theirs = {_ours(n): p.grad for n, p in tr.model.named_parameters() if p.grad is not None}
    assert len(theirs) == sum(1 for p in ours.values() if p.requires_grad) > 0
    for n, g in theirs.items():
        assert (ours[n].grad - g).norm() <= 1e-5 * g.norm(), (n, float((ours[n].grad - g).norm() / g.norm()))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    """TRL's advantage arithmetic (``_generate_and_score_completions``, ``sum_then_normalize``) on rewards with a
    None, an all-None row and a group of equal rewards."""
    from trl.trainer.utils import nanstd

    nan = float("nan")
    per_func = torch.tensor([[1.0, 0.5], [0.0, nan], [1.0, 0.2], [0.3, 0.9], [nan, nan], [2.0, 0.1],
                             [0.5, 0.5], [0.5, 0.5]])
    weights = torch.tensor([1.0, 0.5])
    g = 2
    got, _ = advantages(per_func, weights, g, scale)
    # TRL 1.16, as written in GRPOTrainer._generate_and_score_completions
    unscorable = torch.isnan(per_func).all(dim=1)
    rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    std = nanstd(rewards).expand_as(rewards) if scale == "batch" else \
        nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    want = rewards - mean
    if scale != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (got, want)
