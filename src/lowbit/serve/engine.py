"""Continuous batching: the sequences of every request in flight decoded together, one token a step.

One thread owns the model. Each step it

    admits   waiting sequences (up to ``max_batch`` in flight): each adapter's newcomers are read in one left-padded
             prefill, and their KV cache joined to that adapter's running batch (both left-padded to one length;
             positions count real tokens only, the attention mask hides the padding);
    samples  a token for every row from its last logits: argmax at temperature 0, else
             argmax(filter_top_p(logits / T) + g), g = −log(−log u), u ~ U[0,1) from the sequence's own generator
             (seeded by the request's ``seed`` and the choice's index) — a sequence's tokens do not depend on what
             else shares its batch;
    decodes  one forward per adapter that has rows (the bank switched to it; the base alone for the base's rows).

A sequence ends at a stop token, a stop string (cut before it), ``max_tokens``, or when its client goes away; its
row then leaves the batch, and padding columns no remaining row needs are cropped. Caches other than plain
key/value layers are not joined: with sliding windows newcomers wait until the running batch ends; a model with
recurrent state (Mamba, convolutions) decodes each sequence in a batch of its own, unpadded.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import LowbitError
from ..generation import cache_kwarg, next_logits, sample_token, split_head

__all__ = ["Params", "Sequence", "Engine", "QueueFull"]


class QueueFull(LowbitError):
    """More sequences waiting or running than the engine takes."""


@dataclass
class Params:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class Sequence:
    """One choice of one request: its prompt ids, adapter (None: the base), sampling, and where its text goes —
    ``emit(kind, payload)`` called from the engine's thread: ("delta", text) … then ("done", finish_reason) or
    ("error", message)."""

    def __init__(self, prompt: list[int], adapter: str | None, params: Params, tokenizer, stop_ids, emit,
                 index: int = 0):
        self.prompt, self.adapter, self.params, self.index = prompt, adapter, params, index
        self.tokenizer, self.stop_ids, self.emit = tokenizer, set(stop_ids), emit
        seed = params.seed + index if params.seed is not None else int.from_bytes(os.urandom(6), "little")
        self.seed = seed
        self.tokens: list[int] = []
        self.sent = 0
        self.finish: str | None = None
        self.cancelled = False
        self.submitted = time.monotonic()
        self.first_token: float | None = None
        self.generator: torch.Generator | None = None
        self.last: int | None = None  # the token sampled last (the next decode step's input)

    def push(self, token: int) -> None:
        """Take the next token: emit the text it completes, and end the sequence when it should."""
        if self.first_token is None:
            self.first_token = time.monotonic()
        if token in self.stop_ids:
            self._finish("stop", self._text())
            return
        self.tokens.append(token)
        text = self._text()
        for s in self.params.stop:
            at = text.find(s)
            if at >= 0:
                self._finish("stop", text[:at])
                return
        if len(self.tokens) >= self.params.max_tokens:
            self._finish("length", text)
            return
        hold = max((len(s) - 1 for s in self.params.stop), default=0)  # a stop string may be starting
        safe = text.rstrip("\ufffd")  # an unfinished multi-byte character
        safe = safe[: max(len(safe) - hold, self.sent)]
        if len(safe) > self.sent:
            self.emit("delta", safe[self.sent:])
            self.sent = len(safe)

    def _text(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _finish(self, reason: str, text: str) -> None:
        if len(text) > self.sent:
            self.emit("delta", text[self.sent:])
            self.sent = len(text)
        self.finish = reason
        self.emit("done", reason)


@dataclass
class _Batch:
    """One adapter's rows in flight: their KV cache, attention mask (rows × columns), next positions and logits."""
    rows: list[Sequence]
    cache: object
    mask: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor


class Engine:
    """Decodes the sequences submitted to it on its own thread (``start()``/``stop()``)."""

    def __init__(self, net, bank, max_batch: int = 32, max_queue: int = 256, pad_id: int = 0):
        self.net, self.bank, self.max_batch, self.max_queue, self.pad_id = net, bank, max_batch, max_queue, pad_id
        self.device = next(net.parameters()).device
        self.body, self.head = split_head(net)
        self.kwarg = cache_kwarg(net if self.body is None else self.body)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.batches: dict[tuple, _Batch] = {}  # (adapter, k) → its rows in flight
        self.cond = threading.Condition()
        self.model_lock = threading.RLock()  # held for each step; the bank is changed under it
        self.stopping = False
        self.steps = 0
        self.serial = 0
        self.paddable = _paddable(net, self.body, self.head, self.kwarg, self.device)
        self.rows = 0  # sequences in the running batches (updated by the engine's thread)
        self.thread = threading.Thread(target=self._run, name="lowbit-engine", daemon=True)

    # ---- the other threads' side
    def start(self) -> Engine:
        self.net.eval()
        self.thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        with self.cond:
            if self.queued() + len(seqs) > self.max_queue:
                raise QueueFull(f"the server is busy ({self.queued()} sequences queued or running, at most "
                                f"{self.max_queue}); try again")
            self.waiting.extend(seqs)
            self.cond.notify()

    def queued(self) -> int:
        return len(self.waiting) + self.running()

    def running(self) -> int:
        return self.rows

    def _in_flight(self) -> list[Sequence]:
        """Every sequence waiting or in a batch (callers hold ``cond`` or ``model_lock``: the batches hold still)."""
        return list(self.waiting) + [s for b in self.batches.values() for s in b.rows]

    def in_use(self, adapter: str) -> int:
        """Sequences waiting or running on ``adapter``."""
        with self.cond:
            rows = self._in_flight()
        return sum(s.adapter == adapter and s.finish is None for s in rows)

    def stop(self, timeout: float = 0.0) -> None:
        """Let in-flight sequences finish for up to ``timeout`` seconds, then cancel the rest and end the thread."""
        end = time.monotonic() + timeout
        while self.queued() and time.monotonic() < end:
            time.sleep(0.05)
        with self.cond:
            for s in self._in_flight():
                s.cancelled = True
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()

    # ---- the engine's thread
    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.batches and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    self._fail_all("the server is shutting down", cancelled=True)
                    return
            try:
                with self.model_lock, torch.inference_mode():
                    self._step()
            except Exception as e:  # a failed step fails its sequences, not the server
                self._fail_all(f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _fail_all(self, message: str, cancelled: bool = False) -> None:
        with self.cond:
            seqs = self._in_flight()
            self.waiting.clear()
            self.batches.clear()
            self.rows = 0
        for s in seqs:
            if s.finish is None:
                s.finish = "cancelled" if cancelled else "error"
                s.emit("error", message)

    def _step(self) -> None:
        self._admit()
        for key in list(self.batches):
            batch = self.batches[key]
            self._sample(batch)
            self._drop_finished(key, batch)
            if key in self.batches:
                self.bank.activate(key[0])
                self._decode(batch)
        self.steps += 1
        self.rows = sum(len(b.rows) for b in self.batches.values())

    def _admit(self) -> None:
        """Newcomers into batches keyed (adapter, k): k = 0 for a model whose rows can be padded (one batch per
        adapter: joined when the cache allows, else the newcomers wait for it to end); a fresh k per sequence
        for a model with recurrent state, which padding would change."""
        with self.cond:
            room = self.max_batch - sum(len(b.rows) for b in self.batches.values())
            taken, kept = [], collections.deque()
            while self.waiting and len(taken) < room:
                s = self.waiting.popleft()
                if s.cancelled:
                    s.finish = "cancelled"
                    continue
                busy = self.batches.get((s.adapter, 0))
                (kept if busy is not None and not _joinable(busy.cache) else taken).append(s)
            self.waiting.extendleft(reversed(kept))
        groups: dict[tuple, list[Sequence]] = {}
        for s in taken:
            key = (s.adapter, 0) if self.paddable else (s.adapter, self._serial())
            groups.setdefault(key, []).append(s)
        for key, seqs in groups.items():
            if key[0] is not None and key[0] not in self.bank.adapters:
                for s in seqs:
                    s.finish = "error"
                    s.emit("error", f"adapter {key[0]!r} was removed")
                continue
            self.bank.activate(key[0])
            new = self._prefill(seqs)
            old = self.batches.get(key)
            self.batches[key] = new if old is None else _join(old, new)
        self.rows = sum(len(b.rows) for b in self.batches.values())

    def _serial(self) -> int:
        self.serial += 1
        return self.serial

    def _prefill(self, seqs: list[Sequence]) -> _Batch:
        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt, dtype=torch.long, device=self.device)
            mask[i, width - len(s.prompt):] = 1
            s.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits, cache = next_logits(self.net, self.body, self.head, ids, mask, pos, None, self.kwarg)
        return _Batch(list(seqs), cache, mask, pos[:, -1:], logits)

    def _sample(self, batch: _Batch) -> None:
        for i, s in enumerate(batch.rows):
            if s.finish is not None:
                continue
            if s.cancelled:
                s.finish = "cancelled"
                continue
            s.last = sample_token(batch.logits[i: i + 1], s.params.temperature, s.params.top_p, s.generator)
            s.push(s.last)

    def _drop_finished(self, key, batch: _Batch) -> None:
        keep = [i for i, s in enumerate(batch.rows) if s.finish is None]
        if len(keep) == len(batch.rows):
            return
        if not keep:
            del self.batches[key]
            return
        if not all(hasattr(x, "batch_select_indices") for x in _layers(batch.cache) or [None]):
            return  # finished rows run on until the batch ends; their tokens are not used
        idx = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(idx)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask, batch.pos, batch.logits = batch.mask[idx], batch.pos[idx], batch.logits[idx]
        _crop(batch)

    def _decode(self, batch: _Batch) -> None:
        last = torch.tensor([self.pad_id if s.last is None else s.last for s in batch.rows], device=self.device)
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], 1)
        batch.pos = batch.pos + 1
        batch.logits, batch.cache = next_logits(self.net, self.body, self.head, last[:, None], batch.mask, batch.pos,
                                                batch.cache, self.kwarg)


def _layers(cache) -> list | None:
    layers = getattr(cache, "layers", None)
    return list(layers) if layers is not None else None


def _paddable(net, body, head, kwarg, device) -> bool:
    """Whether rows can be left-padded: the model's cache holds keys and values only (no recurrent state, which
    padding tokens would run through) — probed with one token."""
    from transformers import cache_utils

    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.inference_mode():
        _, cache = next_logits(net, body, head, ids, torch.ones_like(ids), ids, None, kwarg)
    layers = _layers(cache)
    return layers is not None and all(getattr(x, "keys", None) is not None and not isinstance(x, recurrent)
                                      for x in layers)


def _joinable(cache) -> bool:
    """A cache of plain key/value layers (transformers' ``DynamicLayer``): rows can be padded and joined."""
    layers = _layers(cache)
    return bool(layers) and all(type(x).__name__ == "DynamicLayer" and getattr(x, "keys", None) is not None
                                for x in layers)


def _join(old: _Batch, new: _Batch) -> _Batch:
    """The rows of both batches in one: the shorter cache left-padded (masked) to the longer one's length."""
    t_old, t_new = old.mask.shape[1], new.mask.shape[1]
    width = max(t_old, t_new)
    for a, b in zip(_layers(old.cache), _layers(new.cache)):
        a.keys = torch.cat([F.pad(a.keys, (0, 0, width - t_old, 0)), F.pad(b.keys, (0, 0, width - t_new, 0))])
        a.values = torch.cat([F.pad(a.values, (0, 0, width - t_old, 0)), F.pad(b.values, (0, 0, width - t_new, 0))])
    mask = torch.cat([F.pad(old.mask, (width - t_old, 0)), F.pad(new.mask, (width - t_new, 0))])
    return _Batch(old.rows + new.rows, old.cache, mask, torch.cat([old.pos, new.pos]),
                  torch.cat([old.logits, new.logits]))


def _crop(batch: _Batch) -> None:
    """Drop the leading columns that are padding in every row (a joinable cache only)."""
    if not _joinable(batch.cache):
        return
    first = int((batch.mask.cumsum(1) == 0).sum(1).min())
    if first == 0:
        return
    for layer in _layers(batch.cache):
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    batch.mask = batch.mask[:, first:]
