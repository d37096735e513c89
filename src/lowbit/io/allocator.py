"""glibc allocator tuning while a checkpoint streams in.

While loading, allocations over 256 KiB are served with mmap so each freed temporary (a float weight, its
scaled copy) goes straight back to the OS; otherwise glibc's heap fragments between the small packed tensors we
keep and grows to several times the model. Afterwards: glibc's largest default threshold, and a trim.
Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import contextlib

__all__ = ["returning_allocator"]

_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        import ctypes

        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "mallopt") else None


@contextlib.contextmanager
def returning_allocator():
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 256 << 10)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)
