"""``lowbit`` command line: train, plan, eval, generate/chat, merge, quantize, demo — one module per command
over one option vocabulary (``options.py``: every training config key is a flag, spelled the same everywhere).

Problems with the user's input print one line (``error: …``) and exit 2 — no tracebacks.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import LowbitError
from .options import Parser, reject_unknown

__all__ = ["main", "build_parser"]

# command → module (cli/<module>.py has add_parser(sub) and run(args)); chat is generate reading stdin
COMMANDS = {"train": "train", "plan": "plan", "eval": "eval", "generate": "generate", "chat": "generate",
            "merge": "merge", "quantize": "quantize", "demo": "demo"}


def build_parser() -> Parser:
    """The parser; ``parser.commands`` maps each command name to its own sub-parser."""
    p = Parser(prog="lowbit", description="QLoRA fine-tuning: NF4 + double quantization, LoRA, PEFT adapters.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    p.commands = {name: importlib.import_module(f".{module}", __name__).add_parser(sub, name)
                  for name, module in COMMANDS.items()}
    return p


def main(argv=None) -> int:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*kernels.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        reject_unknown(extra, parser.commands[args.cmd])
        return importlib.import_module(f".{COMMANDS[args.cmd]}", __name__).run(args) or 0
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
