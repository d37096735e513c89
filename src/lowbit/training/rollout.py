"""Sampling a group of completions per prompt from the model being trained (4-bit base + current LoRA), batched,
with a KV cache, without autograd state.

    prefill   = each prompt once, left-padded (positions count real tokens only); its KV cache and last logits then
                repeated for its group (a cache that cannot be repeated: the prompts read once per row instead)
    each step = the last position's logits / temperature → top-k → top-p → a token by the Gumbel-max trick:
                argmax(logits + g),  g = −log(−log u),  u ~ U[0,1) drawn from the row's prompt's own generator

A token equal to a stop id ends its row (the stop token is part of the completion) and the row leaves the batch
(when the cache can drop rows; else it runs on, its extra tokens cut off); ``max_new`` ends the rest. Each prompt's
generator is seeded by the caller (run seed, step, sample index), so the same prompt at the same step gets the same
completions whatever else shares the batch and after a resume.
"""

from __future__ import annotations

import torch

from ..generation import cache_kwarg, filter_logits, next_logits, split_head

__all__ = ["sample_completions"]


def _gumbel(gens: list[torch.Generator], group: int, vocab: int, device) -> torch.Tensor:
    """Gumbel noise for every row, ``group`` rows from each prompt's generator (drawn whether a row is finished or
    not, so a prompt's draws never depend on the others)."""
    u = torch.cat([torch.rand((group, vocab), generator=g, device=device) for g in gens])
    return -torch.log(-torch.log(u))


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], group: int, seeds: list[int], max_new: int,
                       stop_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> tuple[list[list[int]], list[bool]]:
    """(completion ids of every row — prompt i's group at rows i·group … — , whether each hit ``max_new`` without
    a stop token). Each prompt is read once (its KV cache then repeated for its group); finished rows leave the
    batch."""
    device = next(model.parameters()).device
    body, head = split_head(model)
    name = cache_kwarg(model if body is None else body)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    out = torch.full((len(prompts) * group, max(max_new, 1)), pad_id, dtype=torch.long, device=device)
    was = model.training
    model.eval()
    try:
        logits, cache = next_logits(model, body, head, ids, mask, pos, None, name)
        mask, pos = mask.repeat_interleave(group, 0), pos.repeat_interleave(group, 0)
        if hasattr(cache, "batch_repeat_interleave"):
            logits = logits.repeat_interleave(group, 0)
            cache.batch_repeat_interleave(group)
        else:
            logits, cache = next_logits(model, body, head, ids.repeat_interleave(group, 0), mask, pos, None, name)
        pos = pos[:, -1:]
        live = torch.arange(len(prompts) * group, device=device)
        done = torch.zeros(len(live), dtype=torch.bool, device=device)
        for t in range(max_new):
            x = filter_logits(logits.float() / temperature, top_k, top_p)
            tok = torch.argmax(x + _gumbel(gens, group, x.shape[-1], device)[live], dim=-1)
            out[live, t] = tok
            done = done | torch.isin(tok, stops)
            if t == max_new - 1 or bool(done.all()):
                break
            if bool(done.any()) and hasattr(cache, "batch_select_indices"):
                keep = ~done
                live, tok, mask, pos, done = live[keep], tok[keep], mask[keep], pos[keep], done[keep]
                cache.batch_select_indices(keep.nonzero()[:, 0])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos + 1
            logits, cache = next_logits(model, body, head, tok[:, None], mask, pos, cache, name)
    finally:
        model.train(was)
    return _trim(out[:, :max_new].tolist(), stops.tolist())


def _trim(table: list[list[int]], stops: list[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row up to and including its first stop token; truncated when it has none."""
    comps, cut = [], []
    for row in table:
        end = next((k for k, t in enumerate(row) if t in stops), None)
        comps.append(row if end is None else row[: end + 1])
        cut.append(end is None)
    return comps, cut
