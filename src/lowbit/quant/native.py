"""Build-at-first-use loader for the C dequantize kernel (``csrc/dequant.c``).

The kernel is compiled once per machine with the system C compiler (``-O3 -march=native -fopenmp``) into
``$LOWBIT_CACHE`` (default ``~/.cache/lowbit/kernels``), named by a hash of the source and the compiler
flags, written to a temporary name and renamed. If there is no compiler, or ``LOWBIT_NATIVE=0``, lowbit
uses the pure-PyTorch path and says nothing. ``kernel()`` returns the loaded library or None.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..atomic import writing_file
from ..cache import cache_root

_SRC = Path(__file__).with_name("csrc") / "dequant.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]


@functools.cache
def kernel():
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS, os.uname().machine]).encode()).hexdigest()[:16]
    out = cache_root() / "kernels" / f"dequant-{tag}.so"
    try:
        if not out.exists():
            with writing_file(out) as tmp_so:
                subprocess.run([cc, *_FLAGS, str(_SRC), "-o", str(tmp_so)], check=True, capture_output=True,
                               timeout=120)
        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.lowbit_dequant.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lowbit_dequant.argtypes = [p, p, p, p, p, ctypes.c_float, i64, p, p, i64, i64, i32, i32, i32]
    return lib
