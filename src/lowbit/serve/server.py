"""What ``lowbit serve`` holds: one 4-bit base, its adapters (``AdapterBank``), the decoding engine, the limits;
model names (``base`` or ``base:adapter``) resolved to an adapter, its tokenizer and stop tokens, and requests
turned into token ids (the chat template of the adapter's tokenizer) and engine sequences."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .adapters import AdapterBank
from .engine import Engine, Sequence
from .requests import ApiError, Request

__all__ = ["Limits", "Server"]


@dataclass
class Limits:
    max_batch: int = 32
    max_queue: int = 256
    max_tokens: int = 512  # per completion, the most a request may ask for (and the chat default)
    max_prompt_tokens: int | None = None  # default: the model's context length
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0


class Server:
    def __init__(self, net, base_model: str, name: str | None = None, adapters: dict | None = None,
                 adapter_root=None, limits: Limits | None = None, force: bool = False):
        from ..io.tokenizer import end_token_ids, tokenizer_for

        self.net, self.base_model, self.limits = net, base_model, limits or Limits()
        self.name = name or Path(str(base_model).rstrip("/")).name
        self.tokenizer = tokenizer_for(base_model)
        self.stop_ids = end_token_ids(self.tokenizer)
        self.bank = AdapterBank(net, base_model, adapter_root, force)
        for adapter, path in (adapters or {}).items():
            self.bank.add(adapter, path)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.engine = Engine(net, self.bank, self.limits.max_batch, self.limits.max_queue, pad)
        cfg = getattr(net, "config", None)
        self.context = int(getattr(cfg, "max_position_embeddings", 0) or 0) or None
        self.created = int(time.time())

    def model_ids(self) -> list[str]:
        return [self.name] + [f"{self.name}:{a}" for a in self.bank.adapters]

    def resolve(self, model: str) -> tuple[str | None, object, list[int]]:
        """``model`` → (adapter name or None, tokenizer, stop token ids); 404 in OpenAI's shape when unknown."""
        base, _, adapter = model.partition(":")
        if base == self.name and not adapter:
            return None, self.tokenizer, self.stop_ids
        if base == self.name and adapter in self.bank.adapters:
            a = self.bank.adapters[adapter]
            return adapter, a.tokenizer, a.stop_ids
        raise ApiError(f"the model {model!r} does not exist; this server has {', '.join(self.model_ids())}",
                       status=404, param="model", code="model_not_found")

    def encode(self, req: Request, tokenizer) -> list[int]:
        """The request's prompt as token ids, checked against the limits."""
        if req.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ApiError("this model's tokenizer has no chat template; use /v1/completions", param="messages")
            text = tokenizer.apply_chat_template(req.messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(req.prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ApiError("the prompt is empty", param="prompt")
        limit = self.limits.max_prompt_tokens or self.context
        if limit and len(ids) > limit:
            raise ApiError(f"the prompt has {len(ids)} tokens, more than this server takes ({limit})",
                           param="messages" if req.chat else "prompt", code="context_length_exceeded")
        default = self.limits.max_tokens if req.chat else min(16, self.limits.max_tokens)
        want = req.max_tokens or default
        if want > self.limits.max_tokens:
            raise ApiError(f"max_tokens is {want}, more than this server allows ({self.limits.max_tokens})",
                           param="max_tokens")
        if self.context and len(ids) + want > self.context:
            if req.max_tokens:
                raise ApiError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                               f"{len(ids)} and max_tokens asks for {want}", param="messages" if req.chat else
                               "prompt", code="context_length_exceeded")
            want = self.context - len(ids)
            if want < 1:
                raise ApiError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                               f"{len(ids)}", param="messages" if req.chat else "prompt",
                               code="context_length_exceeded")
        req.params.max_tokens = want
        return ids

    def sequences(self, req: Request, emit) -> tuple[list[Sequence], int]:
        """The request's ``n`` sequences (``emit(index, kind, payload)``), and its prompt's length in tokens."""
        adapter, tok, stops = self.resolve(req.model)
        ids = self.encode(req, tok)
        seqs = [Sequence(ids, adapter, req.params, tok, stops, lambda k, p, i=i: emit(i, k, p), index=i)
                for i in range(req.n)]
        return seqs, len(ids)
