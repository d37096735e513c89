"""Sampling a group of completions per prompt from the model being trained (4-bit base + current LoRA), batched,
with a KV cache, without autograd state.

    rows      = each prompt repeated ``group`` times, left-padded; positions count real tokens only
    each step = the last position's logits / temperature → top-k → top-p → a token by the Gumbel-max trick:
                argmax(logits + g),  g = −log(−log u),  u ~ U[0,1) drawn from the row's prompt's own generator

A token equal to a stop id ends its row (the stop token is part of the completion); ``max_new`` ends the rest.
Each prompt's generator is seeded by the caller (run seed, step, sample index), so the same prompt at the same step
gets the same completions whatever else shares the batch and after a resume.
"""

from __future__ import annotations

import inspect

import torch

from .loss import _split_head

__all__ = ["sample_completions", "filter_logits"]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits outside the ``top_k`` largest, and outside the smallest set whose probability reaches ``top_p``
    (at least one kept), set to −inf — as transformers' top-k and top-p warpers do, in that order."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def _pick(logits: torch.Tensor, gens: list[torch.Generator], group: int, temperature: float, top_k: int,
          top_p: float) -> torch.Tensor:
    x = filter_logits(logits.float() / temperature, top_k, top_p)
    u = torch.cat([torch.rand((group, x.shape[-1]), generator=g, device=x.device) for g in gens])
    return torch.argmax(x - torch.log(-torch.log(u)), dim=-1)


def _forward(model, body, head, ids, mask, pos, cache):
    """The next-token logits of the last position, and the grown cache (transformers ≥ 5.24 names it ``cache``,
    earlier versions ``past_key_values``)."""
    net = model if body is None else body
    name = "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"
    out = net(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{name: cache})
    cache = out.cache if name == "cache" else out.past_key_values
    if body is None:
        return out.logits[:, -1], cache
    h = out.last_hidden_state[:, -1]
    return torch.nn.functional.linear(h, head.weight.to(h.dtype)), cache


@torch.no_grad()
def sample_completions(model, prompts: list[list[int]], group: int, seeds: list[int], max_new: int,
                       stop_ids: list[int], pad_id: int, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> tuple[list[list[int]], list[bool]]:
    """(completion ids of every row — prompt i's group at rows i·group … — , whether each hit ``max_new`` without
    a stop token)."""
    device = next(model.parameters()).device
    body, head = _split_head(model)
    rows = [p for p in prompts for _ in range(group)]
    width = max(len(p) for p in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, p in enumerate(rows):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    out = []
    was = model.training
    model.eval()
    try:
        logits, cache = _forward(model, body, head, ids, mask, pos, None)
        for _ in range(max_new):
            tok = _pick(logits, gens, group, temperature, top_k, top_p).masked_fill(done, pad_id)
            out.append(tok)
            live = ~done
            done = done | torch.isin(tok, stops)
            if bool(done.all()) or len(out) == max_new:
                break
            mask = torch.cat([mask, live[:, None].long()], 1)
            pos = pos[:, -1:] + 1
            logits, cache = _forward(model, body, head, tok[:, None], mask, pos, cache)
    finally:
        model.train(was)
    return _trim(torch.stack(out, 1).tolist() if out else [[] for _ in rows], stops.tolist())


def _trim(table: list[list[int]], stops: list[int]) -> tuple[list[list[int]], list[bool]]:
    """Each row up to and including its first stop token; truncated when it has none."""
    comps, cut = [], []
    for row in table:
        end = next((k for k, t in enumerate(row) if t in stops), None)
        comps.append(row if end is None else row[: end + 1])
        cut.append(end is None)
    return comps, cut
