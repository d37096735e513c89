"""``gradient_checkpointing: offload``: the checkpointed decoder layers' inputs wait in host memory.

Plain checkpointing keeps each decoder layer's input on the device until backward recomputes the layer:
L layers × tokens × hidden × 2 bytes, the bulk of what checkpointing leaves. The non-reentrant checkpoint saves
those inputs through autograd's saved-tensor hooks, so offloading is a pair of hooks around the forward pass::

    pack(t):    t on an accelerator, ≥ 1 MiB, not a parameter → pinned host copy, made on a side stream
                (it overlaps the next layers' compute; the device memory is freed once the copy is done)
    unpack(h):  the compute stream waits for that copy, then copies h back (asynchronously) for the recompute

The same hooks catch the other large tensors autograd saves outside the checkpoints (the final norm's input,
the logits' softmax), which move too. On the CPU the host is the device: offload is the same as ``true``, and
the run says so once. ``offloading(loss_fn, device)`` wraps a loss function so that its forward runs inside the
hooks (backward needs nothing: each saved tensor carries its own unpack).
"""

from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["HostOffload", "offloading", "MIN_BYTES"]

MIN_BYTES = 1 << 20  # smaller saved tensors stay where they are: their copy costs more than it saves


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of ``device`` (≥ ``min_bytes``, not parameters) held in pinned host memory until backward.
    ``device`` "cpu" copies them within host memory — the same path, useful only to test it."""

    def __init__(self, device: torch.device | str, min_bytes: int = MIN_BYTES):
        self.device, self.min_bytes = torch.device(device), min_bytes
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.moved = 0  # bytes sent to the host by this context, for the log and the tests
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if (t.device != self.device or isinstance(t, torch.nn.Parameter) or t.layout != torch.strided
                or t.numel() * t.element_size() < self.min_bytes):
            return t
        self.moved += t.numel() * t.element_size()
        if self.stream is None:
            return (t.detach().clone(), None)
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t.detach(), non_blocking=True)
        t.record_stream(self.stream)  # the allocator reuses t's memory only after the copy
        return (host, self.stream.record_event())

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, ready = packed
        if ready is None:
            return host
        torch.cuda.current_stream(self.device).wait_event(ready)
        return host.to(self.device, non_blocking=True)


def offloading(loss_fn, device: torch.device):
    """``loss_fn`` whose forward pass keeps large saved tensors in host memory (see the module docstring)."""
    if device.type == "cpu":
        return loss_fn

    @functools.wraps(loss_fn)
    def offloaded(model, batch):
        with HostOffload(device) if torch.is_grad_enabled() else contextlib.nullcontext():
            return loss_fn(model, batch)

    return offloaded
