"""The runs under one output root, for the page: start ``lowbit train`` on a config (a child process writing the
run into ``<root>/<name>/``; its config and log beside it: ``<root>/<name>.yaml``, ``<root>/<name>.log``), stop one
(Ctrl-C: the run writes a checkpoint), resume one, and read each run's state and metrics.

    status   running   a child of ours is training it, or another process holds its lock (``runlock.py``)
             finished  its adapter is written
             stopped   stopped from the page (or checkpoints and no adapter): resume continues it
             failed    the child ended with an error (the last line of its log says which)
             new       nothing written yet
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from ..atomic import writing_file
from ..errors import LowbitError
from ..runlock import RunLock
from ..training.config import TrainConfig, apply_overrides
from .adapters import check_name

__all__ = ["Runs", "config_of"]



def config_of(values: dict) -> TrainConfig:
    """A training config from the page's form values (the YAML keys), checked as ``lowbit train`` checks it."""
    if not isinstance(values, dict):
        raise LowbitError("config: give the keys as a mapping")
    return apply_overrides(TrainConfig(), values).validate()


class Runs:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.children: dict[str, subprocess.Popen] = {}
        self.stopped: set[str] = set()  # runs this page stopped (their process ends with an error: interrupted)

    def folder(self, name: str) -> Path:
        check_name(name)
        return self.root / name

    def start(self, name: str, values: dict | None = None, resume: bool = False) -> dict:
        """Start training run ``name`` on ``values`` (the config keys; a resume reads its saved YAML)."""
        out = self.folder(name)
        if self.state(name)["status"] == "running":
            raise LowbitError(f"run {name!r} is already running")
        config = self.root / f"{name}.yaml"
        if resume:
            if not config.exists():
                raise LowbitError(f"run {name!r} has no config to resume ({config.name})")
        else:
            if out.exists() or config.exists():
                raise LowbitError(f"run {name!r} exists; resume it or choose another name")
            values = {**(values or {}), "output_dir": str(out)}
            config_of(values)  # refused here, in one line, rather than in the child's log
            self.root.mkdir(parents=True, exist_ok=True)
            with writing_file(config) as tmp:
                tmp.write_text(yaml.safe_dump(values, sort_keys=False))
        self.stopped.discard(name)
        cmd = [sys.executable, "-m", "lowbit", "train", str(config), "--quiet", *(["--resume"] if resume else [])]
        with open(self.root / f"{name}.log", "ab") as log:
            self.children[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True)
        return self.state(name)

    def stop(self, name: str) -> dict:
        """Ctrl-C to the run's process: it writes a checkpoint and ends (resume continues it)."""
        child = self.children.get(name)
        if child is None or child.poll() is not None:
            raise LowbitError(f"run {name!r} is not running from this page")
        self.stopped.add(name)
        os.killpg(child.pid, signal.SIGINT)
        try:
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
        return self.state(name)

    def stop_all(self) -> None:
        for name, child in self.children.items():
            if child.poll() is None:
                self.stop(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def state(self, name: str) -> dict:
        out = self.folder(name)
        child = self.children.get(name)
        code = child.poll() if child is not None else None
        if (child is not None and code is None) or _locked(out):
            status = "running"
        elif (out / "adapter_model.safetensors").exists():
            status = "finished"
        elif code not in (None, 0) and name not in self.stopped:
            status = "failed"
        elif name in self.stopped or ((out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())):
            status = "stopped"
        else:
            status = "new"
        last = _last_record(out / "metrics.jsonl")  # the page asks every second: the file's end only
        cfg = _read_yaml(self.root / f"{name}.yaml")
        return {"name": name, "status": status, "step": last.get("step", 0), "loss": last.get("loss"),
                "max_steps": cfg.get("max_steps"), "base_model": cfg.get("base_model"),
                "adapter": (out / "adapter_model.safetensors").exists(),
                "log": _last_line(self.root / f"{name}.log")}

    def metrics(self, name: str) -> list[dict]:
        path = self.folder(name) / "metrics.jsonl"
        rows = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if isinstance(row, dict):
                    rows.append(row)
        return rows


def _locked(folder: Path) -> bool:
    if not (folder / ".lowbit.lock").exists():
        return False
    try:
        with RunLock(folder):
            return False
    except LowbitError:
        return True


def _read_yaml(path: Path) -> dict:
    try:
        out = yaml.safe_load(path.read_text()) if path.exists() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return out if isinstance(out, dict) else {}


def _tail_lines(path: Path, size: int = 4096) -> list[str]:
    """The non-empty lines in the last ``size`` bytes of ``path`` (the first may be cut)."""
    if not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return [ln for ln in f.read().decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]


def _last_line(path: Path) -> str:
    lines = _tail_lines(path)
    return lines[-1] if lines else ""


def _last_record(path: Path) -> dict:
    """The last whole JSON object of a .jsonl file ({} when there is none yet)."""
    for line in reversed(_tail_lines(path)):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written, or cut by the tail
        if isinstance(row, dict):
            return row
    return {}
