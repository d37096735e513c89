"""Checkpoints: everything a run needs to continue exactly, in one folder written atomically.

    checkpoints/step-0000100/
        adapter_config.json, adapter_model.safetensors     the adapter (PEFT format: peft loads it as it is)
        trainer_state.safetensors                          optimizer state tensors + the torch RNG state
        trainer_state.json                                 step, epoch, pos, history, the config, param groups

Only the newest ``save_total_limit`` are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import writing_dir
from ..io.adapters import read_adapter, set_adapter_weights, write_adapter_files
from ..jsonfile import read_object
from .callbacks import Callback
from .state import TrainState

__all__ = ["Checkpointer", "latest_checkpoint", "load_checkpoint", "saved_config"]


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    return cks[-1] if cks else None


def saved_config(ck: Path) -> dict:
    """The config a checkpoint was written with."""
    return read_object(ck / "trainer_state.json").get("config") or {}


class Checkpointer(Callback):
    """Saves every ``every`` steps and at the last step; ``save(state)`` saves now."""

    def __init__(self, out: Path, model, optimizer, cfg, last_step: int):
        self.out, self.model, self.opt, self.cfg, self.last = Path(out), model, optimizer, cfg, last_step
        self.latest: Path | None = None

    def on_step_end(self, state, record):
        if state.step % self.cfg.save_steps == 0 or state.step == self.last:
            self.save(state)

    def save(self, state: TrainState) -> Path:
        from safetensors.torch import save_file

        ckdir = self.out / "checkpoints"
        final = ckdir / f"step-{state.step:07d}"
        sd = self.opt.state_dict()
        flat = {"rng": torch.get_rng_state()}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                flat[f"state.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta = {**state.to_json(), "config": asdict(self.cfg), "param_groups": sd["param_groups"]}
        with writing_dir(final, overwrite=True) as tmp:
            write_adapter_files(self.model, tmp)
            save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp / "trainer_state.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        limit = self.cfg.save_total_limit
        for old in sorted(ckdir.glob("step-*"))[:-limit] if limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        self.latest = final
        return final


def load_checkpoint(ck: Path, model, optimizer) -> TrainState:
    """Put the checkpoint's adapter, optimizer state and RNG state back; return the run's position."""
    from safetensors.torch import load_file

    set_adapter_weights(model, read_adapter(ck)[1], ck)
    meta = read_object(ck / "trainer_state.json")
    flat = load_file(str(ck / "trainer_state.safetensors"))
    sd = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in flat.items():
        if k.startswith("state."):
            _, pid, name = k.split(".", 2)
            sd["state"].setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict(sd)
    torch.set_rng_state(flat["rng"])
    return TrainState.from_json(meta)
