"""Decoding with a (4-bit, adapted) model, one definition for ``lowbit generate``, GRPO's sampler and ``lowbit serve``:

    prefill      the prompt read once (KV cache); only the last position's logits are made (body → head)
    each token   argmax(logits) at temperature 0; else argmax(filter(logits / T) + g), g = −log(−log u),
                 u ~ U[0,1) from the sequence's own generator seeded by ``seed`` (the Gumbel-max trick: a draw from
                 softmax(filter(logits / T))), ``filter`` = top-k then top-p as transformers' warpers

so a seeded answer is the same from ``generate`` as from the server, alone or in a batch. The chat template is
applied unless told not to; ``stream`` prints text as it comes.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import torch
from torch import nn

__all__ = ["chat_prompt", "generate", "split_head", "cache_kwarg", "next_logits", "filter_logits", "sample_token"]


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """``prompt`` as one user turn through the tokenizer's chat template (as it is, without a template)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt


def split_head(model):
    """(body, head) when the model is body → lm_head, so logits can be made for chosen positions only."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # e.g. a peft wrapper: use its own forward
        return None, None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if not isinstance(body, PreTrainedModel) or body is model or head is None or \
            getattr(model.config, "final_logit_softcapping", None):
        return None, None
    return body, head


def cache_kwarg(net) -> str:
    """What ``net.forward`` calls its KV cache: ``cache`` (transformers ≥ 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"


def next_logits(model, body, head, ids, mask, pos, cache, name: str):
    """The next-token logits of the last position, and the grown cache (``name``: ``cache_kwarg``)."""
    net = model if body is None else body
    out = net(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{name: cache})
    cache = out.cache if name == "cache" else out.past_key_values
    if body is None:
        return out.logits[:, -1], cache
    h = out.last_hidden_state[:, -1]
    return torch.nn.functional.linear(h, head.weight.to(h.dtype)), cache


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


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token from one row of logits (1 × vocab): greedy at temperature 0, else Gumbel-max from ``generator``."""
    x = logits.float()
    if temperature <= 0:
        return int(torch.argmax(x, dim=-1))
    x = filter_logits(x / temperature, 0, top_p)
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return int(torch.argmax(x - torch.log(-torch.log(u)), dim=-1))


def _stop_ids(net, tokenizer) -> list[int]:
    ids = getattr(getattr(net, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    return [i for i in [*ids, tokenizer.eos_token_id] if isinstance(i, int)]


@torch.inference_mode()
def generate(net: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool = True, stream: bool = False, seed: int | None = 0,
             stop_ids: list[int] | None = None, images: list[str] | None = None) -> str:
    """The model's continuation of ``prompt`` (only the new text); ``stop_ids``: tokens that end it (default: EOS).
    ``seed`` None: a fresh random one. ``images``: image files shown before the prompt (a vision-language model)."""
    stops = set(stop_ids or _stop_ids(net, tokenizer))
    seed = seed if seed is not None else int.from_bytes(os.urandom(6), "little")
    if images:
        return _generate_with_images(net, tokenizer, prompt, images, max_new_tokens, temperature, top_p, stream,
                                     seed, stops)
    text = chat_prompt(tokenizer, prompt) if chat else prompt
    device = next(net.parameters()).device
    tokens = tokenizer(text, add_special_tokens=not chat)["input_ids"]  # lists: the tensors are made here, on device
    gen = torch.Generator(device=device).manual_seed(seed)
    body, head = split_head(net)
    name = cache_kwarg(net if body is None else body)
    ids = torch.tensor([tokens], device=device)
    mask = torch.ones_like(ids)
    pos = torch.arange(len(tokens), device=device)[None]
    out, shown = [], 0
    was_training = net.training
    net.eval()
    try:
        logits, cache = next_logits(net, body, head, ids, mask, pos, None, name)
        for _ in range(max_new_tokens):
            token = sample_token(logits, temperature, top_p, gen)
            if token in stops:
                break
            out.append(token)
            if stream:
                shown = _show(tokenizer.decode(out, skip_special_tokens=True), shown)
            if len(out) == max_new_tokens:
                break
            mask, pos = torch.cat([mask, mask[:, :1]], 1), pos[:, -1:] + 1
            logits, cache = next_logits(net, body, head, torch.tensor([[token]], device=device), mask, pos, cache,
                                        name)
    finally:
        net.train(was_training)
    answer = tokenizer.decode(out, skip_special_tokens=True)
    if stream:
        _show(answer, shown, final=True)
    return answer


def _generate_with_images(net, tokenizer, prompt: str, images: list[str], max_new_tokens: int, temperature: float,
                          top_p: float, stream: bool, seed: int, stops: set[int]) -> str:
    """A vision-language model's answer to ``images`` then ``prompt`` in one user turn. The prompt's tokens and image
    inputs are made as for training (``data/images.py``, ``data/image_batches.py``); transformers' own decoding
    grows each model's image inputs (M-RoPE offsets, cross-attention masks) with the cache. Greedy at temperature
    0, else sampled from torch's generator seeded by ``seed``."""
    from transformers import TextStreamer

    from .data.batching import collate
    from .data.formats import IGNORE
    from .data.image_batches import ImageBatcher
    from .data.images import piece_ids, processor_of
    from .errors import LowbitError

    proc = processor_of(tokenizer)
    if proc is None:
        raise LowbitError("--image: the model is not a vision-language model (no image processor beside its "
                          "tokenizer)")
    refs = [str(Path(f).resolve()) for f in images]
    turn = [{"role": "user", "content": [{"type": "image"} for _ in refs] + [{"type": "text", "text": prompt}]}]
    user = tokenizer.apply_chat_template(turn, tokenize=False)
    full = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    if not full.startswith(user):
        raise LowbitError("the chat template does not render the generation prompt after the user turn")
    ids = piece_ids(tokenizer, user, refs, "--image") + tokenizer(full[len(user):], add_special_tokens=False)[
        "input_ids"]
    batch = ImageBatcher(proc)(collate([(ids, [IGNORE] * len(ids))], tokenizer.pad_token_id), [refs])
    device = next(net.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", *batch["vision_keys"])}
    torch.manual_seed(seed)
    was_training = net.training
    net.eval()
    try:
        out = net.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                           temperature=temperature if temperature > 0 else None, top_p=top_p if temperature > 0
                           else None, top_k=None, eos_token_id=sorted(stops), pad_token_id=tokenizer.pad_token_id,
                           streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
                           if stream else None)
    finally:
        net.train(was_training)
    new = [t for t in out[0, len(ids):].tolist() if t not in stops]
    return tokenizer.decode(new, skip_special_tokens=True)


def _show(text: str, shown: int, final: bool = False) -> int:
    """Print what of ``text`` is new (an unfinished multi-byte character waits); the length shown."""
    ready = text if final else text.rstrip("\ufffd")
    if len(ready) > shown:
        sys.stdout.write(ready[shown:])
    if final:
        sys.stdout.write("\n")
    sys.stdout.flush()
    return max(shown, len(ready))
