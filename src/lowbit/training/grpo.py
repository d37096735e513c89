"""A GRPO run's loss module: each step's rollout (sample, score, advantages) and the clipped policy loss.

    rollout(step's prompts)  this rank's share of the prompts (whole groups) → ``rollout.sample_completions`` from
                             the model as it is (4-bit base + current LoRA) → reward functions → advantages (per
                             group, or over the step on every rank) → this rank's micro-batches of
                             ``micro_batch_size`` rows: prompt + completion, the completion tokens learned
    forward(micro-batch)     per-token log-probs of the completion (logits / temperature, chunked through the frozen
                             head) → ``grpo_loss.policy_loss``; with β > 0 the reference is the same model with its
                             adapters switched off (``nn.lora.adapters_disabled``), without gradients
    forward(held-out prompts) a group sampled for each, scored: "loss" −Σ reward over the scored completions, so the
                             evaluation's loss is minus the mean reward (``eval_reward`` in the metrics)

Sampling is seeded per prompt by (seed, step, position in the step), so a resumed run samples what the first run
did. The module returns ``(Σ loss, units)`` like ``loss.LossModule`` and keeps its metrics in a ``MetricBook``.
"""

from __future__ import annotations

import torch

from ..data.formats import IGNORE
from ..nn.lora import adapters_disabled
from .grpo_loss import advantages, nanstd, policy_loss, weighted_rewards
from .grpo_spec import GRPOSpec
from .loss import LossModule
from .metrics import MetricBook
from .reward_funcs import func_name, score
from .rollout import sample_completions
from .sequence_logps import token_logps

__all__ = ["GRPOLoss", "prompt_seed", "rollout_fn"]


def prompt_seed(seed: int, step: int, position: int) -> int:
    """The sampling seed of the prompt at ``position`` of step ``step``'s prompts."""
    return ((seed * 1_000_003 + step) * 1_000_003 + position) % (1 << 62)


class GRPOLoss(LossModule):
    def __init__(self, model, spec: GRPOSpec, tokenizer, funcs: list, stop_ids: list[int], world,
                 micro_batch_size: int):
        super().__init__(model)
        self.spec, self.tok, self.funcs, self.stop_ids = spec, tokenizer, funcs, stop_ids
        self.names = [func_name(f) for f in spec.reward_funcs]
        self.world, self.mb = world, micro_batch_size
        self.book = MetricBook()
        self.samples: list[dict] = []   # the last rollout's first completions (log_completions)

    def take_metrics(self, split: str, world) -> dict[str, float]:
        return self.book.take(split, world)

    def rollout(self, prompts: dict, step: int) -> list[dict]:
        """This rank's micro-batches of step ``step`` (1-based) from the step's prompts (``PromptBatches.batch``)."""
        g, world = self.spec.num_generations, self.world
        share = len(prompts["index"]) // world.size
        mine = range(world.rank * share, (world.rank + 1) * share)
        ids = [prompts["prompt_ids"][k] for k in mine]
        cols = [prompts["columns"][k] for k in mine]
        comps, cut = self._sample(ids, [prompt_seed(self.spec.seed, step, k) for k in mine])
        rewards, texts = self._score(cols, comps, [prompts["index"][k] for k in mine])
        adv, total = advantages(rewards, torch.tensor(self.spec.reward_weights), g, self.spec.scale_rewards,
                                self._batch_std)
        self._note(rewards, total, comps, cut, cols, texts)
        rows = [(ids[i // g], c, bool(cut[i]) and self.spec.mask_truncated_completions) for i, c in enumerate(comps)]
        return [self._micro_batch(rows[k : k + self.mb], adv[k : k + self.mb]) for k in range(0, len(rows), self.mb)]

    def _sample(self, ids: list[list[int]], seeds: list[int]) -> tuple[list[list[int]], list[bool]]:
        """A group of completions for each prompt, with the run's sampling settings."""
        return sample_completions(self.model, ids, self.spec.num_generations, seeds, self.spec.max_completion_length,
                                  self.stop_ids, self.tok.pad_token_id, self.spec.temperature, self.spec.top_k,
                                  self.spec.top_p)

    def _function_means(self, rewards: torch.Tensor) -> dict:
        """Each reward function's (sum, count) over the completions it scored."""
        out = {}
        for j, name in enumerate(self.names):
            ok = ~torch.isnan(rewards[:, j])
            out[f"rewards/{name}/mean"] = (float(rewards[ok, j].sum()), int(ok.sum()))
        return out

    def _score(self, cols: list[dict], comps: list[list[int]], index: list[int]) -> tuple[torch.Tensor, list[str]]:
        """``[completions, functions]`` rewards, and the completions' text."""
        g = self.spec.num_generations
        texts = self.tok.batch_decode(comps, skip_special_tokens=True)
        chat = [isinstance(c["prompt"], list) for c in cols]
        completions = [[{"role": "assistant", "content": t}] if chat[i // g] else t for i, t in enumerate(texts)]
        prompts = [c["prompt"] for c in cols for _ in range(g)]
        keys = dict.fromkeys(k for c in cols for k in c if k != "prompt")
        columns = {k: [c.get(k) for c in cols for _ in range(g)] for k in keys}
        where = [f"sample {index[i // g]} of the data, completion {i % g + 1} ({texts[i][:40]!r})"
                 for i in range(len(texts))]
        return score(self.funcs, self.names, prompts, completions, {**columns, "completion_ids": comps}, where), texts

    def _evaluate(self, prompts: dict) -> tuple[torch.Tensor, int]:
        """(−Σ weighted rewards, completions) of a group for each held-out prompt, sampled as in training from
        seeds fixed per prompt (step 0), so every evaluation compares like with like; the rewards go to the book."""
        comps, _ = self._sample(prompts["prompt_ids"], [prompt_seed(self.spec.seed, 0, k) for k in prompts["index"]])
        rewards, _ = self._score(prompts["columns"], comps, prompts["index"])
        total = weighted_rewards(rewards, torch.tensor(self.spec.reward_weights))
        device = next(self.model.parameters()).device
        if prompts.get("pad"):  # a rank's padding pass: the same work, nothing counted
            return torch.zeros((), device=device), 0
        ok = ~torch.isnan(total)
        self.book.add("eval", {"reward": (float(total[ok].sum()), int(ok.sum())), **self._function_means(rewards)})
        return torch.tensor(-float(total[ok].sum()), device=device), int(ok.sum())

    def _batch_std(self, r: torch.Tensor) -> torch.Tensor:
        """The unbiased std of the weighted rewards of the whole step, over every rank (NaNs left out)."""
        if self.world.size == 1:
            return nanstd(r)
        ok = ~torch.isnan(r)
        s, n = self.world.sum(float(r[ok].sum()), float(ok.sum()))
        (sq,) = self.world.sum(float(((r[ok] - s / max(n, 1.0)) ** 2).sum()))
        return torch.tensor((sq / max(n - 1, 1.0)) ** 0.5, dtype=torch.float32)

    def _note(self, rewards, total, comps, cut, cols, texts) -> None:
        """The step's sampling metrics, and its first completions for ``log_completions``."""
        g = self.spec.num_generations
        m = {"reward": (float(torch.nansum(total)), int((~torch.isnan(total)).sum())),
             "reward_std": (float(nanstd(total)) if len(total) > 1 else 0.0, 1),
             "frac_reward_zero_std": (float((nanstd(total.view(-1, g), 1) < 1e-6).sum()), len(total) // g),
             "completions/mean_length": (float(sum(len(c) for c in comps)), len(comps)),
             "completions/clipped_ratio": (float(sum(cut)), len(comps)), **self._function_means(rewards)}
        self.book.add("train", m)
        self.samples = [{"prompt": cols[i // g]["prompt"], "completion": texts[i], "reward": float(total[i])}
                        for i in range(min(len(comps), 4))]

    def _micro_batch(self, rows: list, adv: torch.Tensor) -> dict:
        width = max(len(p) + len(c) for p, c, _ in rows)
        pad = self.tok.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device="cpu")
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
        for i, (p, c, masked) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c, device="cpu")
            mask[i, : len(p) + len(c)] = 1
            if not masked:
                labels[i, len(p) : len(p) + len(c)] = torch.tensor(c, device="cpu")
        learned = int((labels != IGNORE).sum())
        units = {"grpo": len(rows), "dapo": learned}.get(self.spec.loss_type, 1)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "adv": adv.float(), "units": units}

    def _logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the learned (completion) tokens as ``[rows, width − 1]``, and their mask."""
        device = next(self.model.parameters()).device
        keep = (batch["labels"][:, 1:] != IGNORE).to(device)
        targets = batch["input_ids"][:, 1:].to(device)[keep]
        flat = token_logps(self.model, batch, keep, targets, self.spec.temperature)
        return torch.zeros(keep.shape, dtype=flat.dtype, device=device).masked_scatter(keep, flat), keep

    def forward(self, batch: dict) -> tuple[torch.Tensor, float]:
        if "rollout" in batch:  # sampling inside the wrapper's forward: FSDP2 gathers the root's parameters for it
            return self.rollout(batch["rollout"], batch["step"])
        if "prompt_ids" in batch:  # held-out prompts (evaluation.evaluate)
            return self._evaluate(batch)
        logp, mask = self._logps(batch)
        ref = None
        if self.spec.beta != 0.0:
            with torch.no_grad(), adapters_disabled(self.model):
                ref = self._logps(batch)[0]
        loss, units, metrics = policy_loss(self.spec, logp, None, ref, batch["adv"].to(logp.device), mask)
        self.book.add("train", metrics)
        return loss, units


def rollout_fn(trainer, module: GRPOLoss, world):
    """The loop's ``rollout``: the module's own, or under FSDP2 a call through the sharded root (whose forward
    gathers the embeddings and head the sampler reads), without gradients."""
    if world.mode != "fsdp":
        return module.rollout

    def through_root(prompts: dict, step: int) -> list[dict]:
        with torch.no_grad():
            return trainer({"rollout": prompts, "step": step})

    return through_root
