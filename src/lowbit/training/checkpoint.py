"""Checkpoints: everything a run needs to continue exactly, in one folder written atomically by rank 0.

    checkpoints/step-0000100/
        adapter_config.json, adapter_model.safetensors     the adapter (PEFT format: peft loads it as it is)
        tokenizer files                                    when the run changed the tokenizer (tokens, template)
        trainer_state.safetensors                          optimizer state tensors + the torch RNG state
        trainer_state.json                                 step, epoch, pos, history, the config, param groups,
                                                           world size and distributed mode

Several ranks: the adapter is gathered whole; the RNG state of every rank is kept (``rng.<rank>``, and
``cuda_rng.<rank>`` when the run computes on GPUs); under FSDP
each rank's optimizer state covers its own shard and is kept as ``state.<param>.<key>.rank<r>``. A run resumes
under the same world size and mode only. Only the newest ``save_total_limit`` checkpoints are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..atomic import writing_dir
from ..errors import LowbitError
from ..io.adapters import adapter_tensors, read_adapter, set_adapter_weights, write_adapter_files
from ..jsonfile import read_object
from .callbacks import Callback
from .device import rng_states, set_rng_states
from .distributed import World
from .state import TrainState

__all__ = ["Checkpointer", "latest_checkpoint", "saved_meta", "load_adapter_weights", "load_trainer_state"]


def latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    return cks[-1] if cks else None


def saved_meta(ck: Path) -> dict:
    """trainer_state.json of a checkpoint: its config, world size, position, …"""
    return read_object(ck / "trainer_state.json")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


class Checkpointer(Callback):
    """Saves every ``save_steps`` steps and at the last step; ``save(state)`` saves now (on every rank: the
    gathering is collective, the writing rank 0's)."""

    def __init__(self, out: Path, model, optimizer, cfg, last_step: int, world: World | None = None, tokenizer=None,
                 device=None):
        self.out, self.model, self.opt, self.cfg, self.last = Path(out), model, optimizer, cfg, last_step
        self.world = world or World()
        self.device = torch.device(device or "cpu")
        self.tokenizer = tokenizer  # a tokenizer the run changed (new tokens, template): saved with each checkpoint
        self.latest: Path | None = None

    def on_step_end(self, state, record):
        if state.stop_failed:  # a run that went wrong keeps its last good checkpoint
            return
        if state.step % self.cfg.save_steps == 0 or state.step == self.last or state.stop_reason \
                or (state.step == 1 and self.cfg.save_first_step):
            self.save(state)

    def save(self, state: TrainState) -> Path:
        from safetensors.torch import save_file

        world = self.world
        tensors = adapter_tensors(self.model)  # whole tensors (gathered under FSDP)
        sd = self.opt.state_dict()
        mine = {f"state.{pid}.{k}": _local(v).cpu() if torch.is_tensor(v) else torch.tensor(v, device="cpu")
                for pid, st in sd["state"].items() for k, v in st.items()}
        rngs = world.gather(rng_states(self.device))
        shards = world.gather(mine) if world.mode == "fsdp" else [mine]
        final = self.out / "checkpoints" / f"step-{state.step:07d}"
        if world.main:
            flat = {}
            for r, states in enumerate(rngs):  # the CPU generator's state, and the GPU's when the run used one
                for kind, t in states.items():
                    flat[f"{'rng' if kind == 'cpu' else kind + '_rng'}" + (f".{r}" if world.size > 1 else "")] = t
            for r, shard in enumerate(shards):
                flat.update({k + (f".rank{r}" if world.mode == "fsdp" else ""): v for k, v in shard.items()})
            meta = {**state.to_json(), "config": asdict(self.cfg), "param_groups": sd["param_groups"],
                    "world_size": world.size, "distributed": world.mode}
            with writing_dir(final, overwrite=True) as tmp:
                write_adapter_files(self.model, tmp, tensors=tensors)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(str(tmp))
                save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp / "trainer_state.safetensors"))
                (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
            limit = self.cfg.save_total_limit
            for old in sorted(final.parent.glob("step-*"))[:-limit] if limit > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        world.barrier()  # nobody goes on (or reads it) before it is complete
        self.latest = final
        return final


def load_adapter_weights(ck: Path, model) -> None:
    """The checkpoint's adapter into the (not yet wrapped) model."""
    set_adapter_weights(model, read_adapter(ck)[1], ck)


def load_trainer_state(ck: Path, optimizer, world: World | None = None, device=None) -> TrainState:
    """Optimizer state and this rank's RNG states back (the GPU's too); the run's position."""
    from safetensors.torch import load_file

    world = world or World()
    meta = saved_meta(ck)
    flat = load_file(str(ck / "trainer_state.safetensors"))
    suffix = f".rank{world.rank}" if world.mode == "fsdp" else ""
    sd = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in flat.items():
        if k.startswith("state.") and k.endswith(suffix) and (suffix or ".rank" not in k):
            pid, name = k[len("state."): len(k) - len(suffix)].split(".", 1)
            sd["state"].setdefault(int(pid), {})[name] = v
    if not getattr(optimizer, "local_state", False):  # torch's optimizers keep DTensor state for DTensor params
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for pid, st in sd["state"].items():
            p = params[pid]
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import DTensor

                for k, v in st.items():
                    if v.dim():
                        st[k] = DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
    optimizer.load_state_dict(sd)
    suffix = f".{world.rank}" if world.size > 1 else ""
    rng = flat.get(f"rng{suffix}")
    if rng is None:
        raise LowbitError(f"{ck}: no RNG state for rank {world.rank}")
    states = {"cpu": rng, **({"cuda": flat[f"cuda_rng{suffix}"]} if f"cuda_rng{suffix}" in flat else {})}
    set_rng_states(states, torch.device(device or "cpu"))
    return TrainState.from_json(meta)
