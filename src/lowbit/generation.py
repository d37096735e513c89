"""Text generation with a (4-bit, adapted) model: transformers' ``generate``, the chat template applied.

Greedy when ``temperature`` is 0, else sampled with ``top_p``; ``stream`` prints tokens as they come.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["chat_prompt", "generate"]


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """``prompt`` as one user turn through the tokenizer's chat template (as it is, without a template)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate(net: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool = True, stream: bool = False, seed: int | None = 0,
             stop_ids: list[int] | None = None) -> str:
    """The model's continuation of ``prompt`` (only the new text); ``stop_ids``: tokens that end it (default: EOS)."""
    from transformers import TextStreamer

    text = chat_prompt(tokenizer, prompt) if chat else prompt
    device = next(net.parameters()).device
    tokens = tokenizer(text, add_special_tokens=not chat)["input_ids"]  # lists: the tensors are made here, on device
    ids = {"input_ids": torch.tensor([tokens], device=device),
           "attention_mask": torch.ones(1, len(tokens), dtype=torch.long, device=device)}
    if seed is not None:
        torch.manual_seed(seed)
    kw = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
          **({"eos_token_id": stop_ids} if stop_ids else {})}
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    was_training = net.training
    net.eval()
    try:
        out = net.generate(**ids, streamer=streamer, **kw)
    finally:
        net.train(was_training)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
