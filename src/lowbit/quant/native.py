"""Build-at-first-use loader for the C dequantize kernel (``csrc/dequant4.c``).

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
import tempfile
from pathlib import Path

_SRC = Path(__file__).with_name("csrc") / "dequant4.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowbit")
    return Path(root) / "kernels"


@functools.cache
def kernel():
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = _SRC.read_bytes()
    tag = hashlib.sha256(src + " ".join([cc, *_FLAGS, os.uname().machine]).encode()).hexdigest()[:16]
    out = cache_dir() / f"dequant4-{tag}.so"
    try:
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
                tmp_so = Path(tmp) / out.name
                subprocess.run([cc, *_FLAGS, str(_SRC), "-o", str(tmp_so)], check=True, capture_output=True, timeout=120)
                os.replace(tmp_so, out)
        lib = ctypes.CDLL(str(out))
    except (OSError, subprocess.SubprocessError):
        return None
    lib.lowbit_dequant4.restype = ctypes.c_int
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lowbit_dequant4.argtypes = [p, p, p, p, p, ctypes.c_float, i64, p, p, i64, i64, ctypes.c_int, ctypes.c_int]
    return lib
