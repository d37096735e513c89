"""glibc's heap: handing freed pages back to the OS, and allocator tuning while a checkpoint streams in.

``trim_host_heap()`` is ``malloc_trim(0)``: every free page of the heap goes back (``madvise``), wherever it lies —
glibc alone returns only the top of the heap, so pages freed between small long-lived blocks stay resident.

While loading, allocations over 256 KiB are served with mmap so each freed temporary (a float weight, its
scaled copy) goes straight back to the OS; the smaller temporaries of quantization still fragment the heap between
the small packed tensors we keep, so ``returning_allocator`` hands back a ``release`` the loader calls as it goes
(measured on a ~290 M-parameter VLM: 260 MB of freed pages resident by the end of loading without it). Afterwards:
glibc's largest default threshold, and a trim. Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os

__all__ = ["returning_allocator", "trim_host_heap", "can_trim", "resident_bytes", "TRIM_MIN_BYTES", "TRIM_SLACK_BYTES"]

_M_MMAP_THRESHOLD = -3
# training trims between decoder layers whose outputs reach this size (training/host_memory.py); shorter steps leave
# little behind and are not worth the calls — the planner's CPU backward term depends on which side a step is
TRIM_MIN_BYTES = 1 << 20
# ... and only once the process's resident memory has grown this much since the last trim: below it the freed pages
# are reused by the next layer's temporaries, and handing them back costs a page fault each when they are
TRIM_SLACK_BYTES = 256 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def can_trim() -> bool:
    """Whether this process's allocator is glibc's (``trim_host_heap`` does something)."""
    return _libc() is not None


def trim_host_heap() -> bool:
    """Return the heap's free pages to the OS; whether glibc's ``malloc_trim`` was there to do it."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def resident_bytes() -> int:
    """This process's resident memory now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return 0


@contextlib.contextmanager
def returning_allocator(every: int = 8):
    """Loading's allocator settings; yields ``release()``, to be called once per tensor made: it trims the heap
    every ``every``-th call."""
    libc, calls = _libc(), [0]

    def release():
        calls[0] += 1
        if calls[0] % every == 0:
            trim_host_heap()

    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
    try:
        yield release
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            trim_host_heap()
