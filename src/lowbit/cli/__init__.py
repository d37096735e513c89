"""``lowbit`` command line: train, plan, eval, generate/chat, merge, quantize, export, demo, serve, ui — one module
per command over one option vocabulary (``options.py``: every training config key is a flag, spelled the same
everywhere).

No traceback reaches a user: a problem with the input, a file or the machine prints one line (``error: …``) and
exits 2; anything unexpected prints one line and exits 1, and ``--debug`` (anywhere on the line) or
``LOWBIT_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import LowbitError
from .options import Parser, reject_unknown

__all__ = ["main", "build_parser"]

# command → module (cli/<module>.py has add_parser(sub) and run(args)); chat is generate reading stdin
COMMANDS = {"train": "train", "plan": "plan", "eval": "eval", "generate": "generate", "chat": "generate",
            "merge": "merge", "quantize": "quantize", "export": "export", "demo": "demo", "serve": "serve", "ui": "ui"}


def build_parser() -> Parser:
    """The parser; ``parser.commands`` maps each command name to its own sub-parser."""
    p = Parser(prog="lowbit", description="QLoRA fine-tuning: NF4 + double quantization, LoRA, PEFT adapters.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    p.commands = {name: importlib.import_module(f".{module}", __name__).add_parser(sub, name)
                  for name, module in COMMANDS.items()}
    return p


def main(argv=None) -> int:
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LOWBIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        reject_unknown(extra, parser.commands[args.cmd])
        return importlib.import_module(f".{COMMANDS[args.cmd]}", __name__).run(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2 if isinstance(e, (LowbitError, OSError)) else 1


def _one_line(e: Exception) -> str:
    if isinstance(e, LowbitError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:  # the file system or the machine: name the path
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}: {first} (run with --debug for the traceback)"
