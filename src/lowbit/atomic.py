"""Atomic writes: build in a temporary file or folder beside the target, then one ``os.replace``.

On any error (Ctrl-C included) the temporary is removed and the target is left as it was, so a reader never
sees a half-written file or folder. A write that fails for want of space or permission (disk full, a file-size
limit, a read-only folder) becomes one ``LowbitError`` naming the path and the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LowbitError

__all__ = ["writing_file", "writing_dir", "replace_dir", "write_error"]


def write_error(path, e: BaseException) -> LowbitError | None:
    """The one-line error for a failed write of ``path`` (None if ``e`` is not a write failure).

    safetensors reports OS errors as its own ``SafetensorError`` ("… (os error 27)"), so those count too.
    """
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    elif type(e).__name__ == "SafetensorError" and "os error" in str(e):
        reason = str(e).splitlines()[0].strip().rpartition("error: ")[2]  # "File too large (os error 27)"
    else:
        return None
    return LowbitError(f"{path}: could not write ({reason}); what was there before is unchanged")


@contextlib.contextmanager
def _cleaning(tmp: Path, target: Path):
    """Remove ``tmp`` on any error, and name ``target`` in the error when a write failed."""
    try:
        yield
    except BaseException as e:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        err = write_error(target, e)
        if err is not None:
            raise err from None
        raise


@contextlib.contextmanager
def writing_file(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same suffix); on success it replaces ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-", suffix=path.suffix)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from None
    with _cleaning(Path(tmp), path):
        yield Path(tmp)
        os.replace(tmp, path)


@contextlib.contextmanager
def writing_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield an empty temporary folder beside ``out``; on success it replaces ``out`` in one rename.

    Refuses a non-empty ``out`` unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as e:
        raise write_error(out, e) from None
    with _cleaning(tmp, out):
        yield tmp
        replace_dir(tmp, out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``, replacing what was there (moved aside, then removed)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
