"""The command line's one option vocabulary: every training config key is a flag spelled the same way in
every command (``lora_r`` → ``--lora-r``), defined here once, coerced and validated by the config itself.

Older spellings stay accepted as aliases (``--model`` for ``--base-model``, ``--seq-len`` for
``--sequence-len``, …). Boolean keys take ``--key true|false`` or a bare ``--key`` (true).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys

from ..dtypes import DTYPE_ALIASES
from ..errors import LowbitError
from ..training.config import CHOICES, TrainConfig, apply_overrides, load_config

__all__ = ["Parser", "FIELDS", "MODEL_KEYS", "add_config_flags", "config_from", "load_model", "reject_unknown"]

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# the keys that say which model to load and how
MODEL_KEYS = ("base_model", "load_in_4bit", "load_in_8bit", "quant_type", "blocksize", "double_quant", "compute_dtype",
              "trust_remote_code", "device", "quantize_vision")
ALIASES = {"base_model": ("--model",), "datasets": ("--data",), "dataset_format": ("--format",),
           "micro_batch_size": ("--batch-size", "--batch"), "sequence_len": ("--seq-len",),
           "lora_target_modules": ("--lora-targets",)}
NEGATIONS = {"load_in_4bit": "--no-quantize", "double_quant": "--no-double-quant"}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad argument raises ``LowbitError`` (printed as ``error: …``)."""

    def error(self, message):
        raise LowbitError(f"{self.prog}: {message}")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, keys=None, required=()) -> None:
    """Add ``keys`` (default: all) of the training config as flags; unset flags leave the config's value."""
    group = parser.add_argument_group("config keys (the same as in a YAML config file)")
    for key in keys or FIELDS:
        f = FIELDS[key]
        kw = dict(dest=key, default=argparse.SUPPRESS, required=key in required, help=f"default: {f.default!r}")
        if key in CHOICES:
            names = [str(c).lower() if isinstance(c, bool) else c for c in CHOICES[key]]
            names += list(DTYPE_ALIASES) if key == "compute_dtype" else []
            kw.update(choices=names, help=f"{', '.join(names)} (default: {f.default!r})")
        if isinstance(f.default, bool):
            kw.update(nargs="?", const="true", metavar="true|false")
        group.add_argument(_flag(key), *ALIASES.get(key, ()), **kw)
        if key in NEGATIONS:
            group.add_argument(NEGATIONS[key], dest=key, action="store_const", const="false",
                               default=argparse.SUPPRESS, help=f"the same as {_flag(key)} false")


def reject_unknown(extra: list[str], parser: argparse.ArgumentParser) -> None:
    """One line for the first unknown argument, with the nearest known flag."""
    if not extra:
        return
    bad = extra[0]
    if not bad.startswith("-"):
        raise LowbitError(f"{parser.prog}: unexpected argument {bad!r}")
    flag = bad.split("=")[0]
    known = [s for a in parser._actions for s in a.option_strings]
    near = difflib.get_close_matches(flag, known, n=1)
    hint = f" — did you mean {near[0].lstrip('-').replace('-', '_')!r} ({near[0]})?" if near else ""
    raise LowbitError(f"{parser.prog}: unknown flag {flag}{hint}")


def config_from(args: argparse.Namespace, config_file=None, report=None) -> TrainConfig:
    """The training config: defaults, then the YAML file (if any), then the flags given. ``report``
    (``training.axolotl.Report``) collects what the file's Axolotl keys became."""
    cfg = load_config(config_file, report)
    apply_overrides(cfg, {k: getattr(args, k) for k in FIELDS if hasattr(args, k)}, from_string=True)
    return cfg.validate()


def load_model(cfg: TrainConfig, adapter=None, force: bool = False, computes: bool = True):
    """The model the config's model keys describe (quantized while it streams in), with ``adapter`` added (the base
    loaded with the config.json fields the adapter's run replaced, e.g. its ``rope_scaling``); ``computes``: the
    command runs the model (a merge only adds the adapters), so a compute dtype this CPU multiplies slowly is said."""
    from ..dtypes import slow_on_cpu, to_torch
    from ..io.adapters import adapter_config_overrides, load_adapter
    from ..io.loader import load
    from ..training.device import resolve_device

    device = resolve_device(cfg.device)
    dtype = to_torch(cfg.compute_dtype, device.type)
    overrides = {**(cfg.model_config or {}), **((adapter and adapter_config_overrides(adapter)) or {})}
    net = load(cfg.base_model, cfg.quant_spec(), compute_dtype=dtype, trust_remote_code=cfg.trust_remote_code,
               device=device, config_overrides=overrides or None, quantize_vision=cfg.quantize_vision)
    if adapter:
        load_adapter(net, adapter, force=force)
    if computes and (note := slow_on_cpu(dtype, device.type)):  # after loading: errors stay one line
        print(note, file=sys.stderr)  # stderr: stdout may be a --json answer
    return net
