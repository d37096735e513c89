"""``gradient_checkpointing: offload`` / ``offload_disk``: the checkpointed decoder layers' inputs wait in host
memory, or on disk.

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

``offload_disk`` (Axolotl's ``activation_offloading: disk``) writes the same saved tensors (contiguous ones) to
temporary files instead, on any device::

    pack(t):    bytes of t (through host memory on an accelerator) → an unlinked file in TMPDIR
    unpack(f):  a new tensor read back from the file (onto t's device); the file goes when autograd drops it

so a long step's checkpoints (layers × tokens × hidden × 2 bytes: 2.1 GiB for SmolLM2 at 65,536 tokens) leave the
process's memory: they sit in the kernel's page cache until it writes them out, which it can do under pressure.
A TMPDIR on a memory file system (tmpfs) saves nothing; the run says so.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import torch

from ..errors import LowbitError

__all__ = ["HostOffload", "DiskOffload", "offloading", "disk_note", "MIN_BYTES"]

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


class DiskOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors (≥ ``min_bytes``, contiguous, not parameters) kept in unlinked files of ``folder`` (default:
    TMPDIR) until backward reads them back."""

    def __init__(self, folder: str | None = None, min_bytes: int = MIN_BYTES):
        self.folder, self.min_bytes = folder, min_bytes
        self.moved = 0  # bytes written by this context, for the log and the tests
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if (isinstance(t, torch.nn.Parameter) or t.layout != torch.strided or not t.is_contiguous()
                or t.numel() * t.element_size() < self.min_bytes):
            return t
        host = t.detach().cpu().reshape(-1)
        size = host.numel() * host.element_size()
        try:
            f = tempfile.TemporaryFile(dir=self.folder)  # unlinked at once: closed (or the process gone), it is gone
            f.write(memoryview(host.view(torch.uint8).numpy()))
            f.flush()
        except OSError as e:
            where = self.folder or tempfile.gettempdir()
            raise LowbitError(f"gradient_checkpointing: offload_disk could not write {size:,} bytes under {where}: "
                              f"{e.strerror or e} — free disk space there, point TMPDIR elsewhere, or use "
                              "gradient_checkpointing: true") from None
        self.moved += size
        return (f, t.shape, t.dtype, t.device)

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        f, shape, dtype, device = packed
        out = torch.empty(shape, dtype=dtype, device="cpu")
        f.seek(0)
        f.readinto(memoryview(out.reshape(-1).view(torch.uint8).numpy()))
        return out.to(device)


def disk_note(folder: str | None = None) -> str:
    """One line for the log: where ``offload_disk`` writes, and whether that saves memory at all."""
    where = Path(folder or tempfile.gettempdir()).resolve()
    mounts = Path("/proc/mounts").read_text().splitlines() if Path("/proc/mounts").exists() else []
    holding = [(Path(p[1]), p[2]) for p in map(str.split, mounts) if len(p) > 2
               and (where == Path(p[1]) or Path(p[1]) in where.parents)]
    # the deepest mount point holding the folder; of two at one point, the later (it hides the earlier)
    fs = max(reversed(holding), key=lambda m: len(m[0].parts), default=(None, ""))[1]
    return (f"gradient_checkpointing: offload_disk — checkpoints wait in files under {where}"
            + (f" ({fs}: in memory, so this saves none; set TMPDIR to a folder on disk)"
               if fs in ("tmpfs", "ramfs") else ""))


def offloading(loss_fn, device: torch.device, disk: bool = False):
    """``loss_fn`` whose forward pass keeps large saved tensors in host memory — or, ``disk``, in files (see the
    module docstring)."""
    if device.type == "cpu" and not disk:
        return loss_fn

    @functools.wraps(loss_fn)
    def offloaded(model, batch):
        hooks = DiskOffload() if disk else HostOffload(device)
        with hooks if torch.is_grad_enabled() else contextlib.nullcontext():
            return loss_fn(model, batch)

    return offloaded
