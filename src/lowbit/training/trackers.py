"""Experiment trackers: the step metrics (loss, lr, grad norm, tokens/s, eval loss) and the run's config go to
TensorBoard, Weights & Biases and MLflow, each when the config asks for it — from rank 0 only.

    tensorboard: true                        output_dir/tensorboard/ (the tensorboard package)
    wandb_project (or use_wandb: true)       a W&B run: wandb_entity, wandb_name, wandb_run_id (resumes that run),
                                             wandb_mode (online | offline | disabled; default: W&B's own, e.g. the
                                             WANDB_MODE variable); files under output_dir/wandb
    mlflow_tracking_uri / _experiment_name   an MLflow run (mlflow_run_name) in that store (or use_mlflow: true)

A tracker asked for whose package is not installed stops the run before anything loads, in one line naming the pip
extra (``pip install 'lowbit[trackers]'``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from ..errors import LowbitError
from .callbacks import Callback, logged

__all__ = ["trackers_for", "check_trackers", "TensorBoard", "WandB", "MLflow"]

KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "eval_loss")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}


def _wanted(cfg) -> list[str]:
    out = ["tensorboard"] if cfg.tensorboard else []
    if (cfg.use_wandb or cfg.wandb_project) and cfg.wandb_mode != "disabled":
        out.append("wandb")
    if cfg.use_mlflow or cfg.mlflow_tracking_uri or cfg.mlflow_experiment_name:
        out.append("mlflow")
    return out


def check_trackers(cfg) -> None:
    """Refuse a run whose trackers are not installed (before anything loads)."""
    for name in _wanted(cfg):
        if importlib.util.find_spec(name) is None:
            raise LowbitError(f"{name} is asked for ({'tensorboard' if name == 'tensorboard' else name + '_…'} keys) "
                              f"but not installed: pip install 'lowbit[trackers]' (or pip install {PACKAGES[name]})")


def _scalars(record: dict) -> dict:
    """The numbers a tracker gets: ``KEYS``, and a preference run's rewards / KL (and their eval_ forms)."""
    extra = [k for k in record if k.removeprefix("eval_").split("/")[0] in ("rewards", "kl")]
    return {k: record[k] for k in (*KEYS, *extra) if record.get(k) is not None}


class TensorBoard(Callback):
    def __init__(self, logdir: Path, every: int = 1):
        self.logdir, self.every, self.writer = Path(logdir), every, None

    def on_train_begin(self, state):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.logdir))

    def on_step_end(self, state, record):
        if logged(state, record, self.every):
            for k, v in _scalars(record).items():
                self.writer.add_scalar(k, v, state.step)

    def on_train_end(self, state):
        if self.writer is not None:
            self.writer.close()


class WandB(Callback):
    def __init__(self, cfg, out: Path, every: int = 1):
        self.cfg, self.out, self.every, self.run = cfg, Path(out), every, None

    def on_train_begin(self, state):
        import wandb

        c = self.cfg
        self.run = wandb.init(project=c.wandb_project or None, entity=c.wandb_entity or None,
                              name=c.wandb_name or None, id=c.wandb_run_id or None,
                              resume="allow" if c.wandb_run_id else None, mode=c.wandb_mode or None,
                              dir=str(self.out), config=dataclasses.asdict(c), reinit="finish_previous")

    def on_step_end(self, state, record):
        if logged(state, record, self.every):
            self.run.log(_scalars(record), step=state.step)

    def on_train_end(self, state):
        if self.run is not None:
            self.run.finish(exit_code=1 if state.stop_failed else 0)


class MLflow(Callback):
    def __init__(self, cfg, every: int = 1):
        self.cfg, self.every, self.run = cfg, every, None

    def on_train_begin(self, state):
        import mlflow

        c = self.cfg
        if c.mlflow_tracking_uri:
            if c.mlflow_tracking_uri.startswith("file:") or "://" not in c.mlflow_tracking_uri:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local folder: MLflow's file store
            mlflow.set_tracking_uri(c.mlflow_tracking_uri)
        if c.mlflow_experiment_name:
            mlflow.set_experiment(c.mlflow_experiment_name)
        self.run = mlflow.start_run(run_name=c.mlflow_run_name or None)
        params = {k: str(v)[:500] for k, v in dataclasses.asdict(c).items()}
        mlflow.log_params(params)

    def on_step_end(self, state, record):
        if logged(state, record, self.every):
            import mlflow

            mlflow.log_metrics(_scalars(record), step=state.step)

    def on_train_end(self, state):
        if self.run is not None:
            import mlflow

            mlflow.end_run(status="FAILED" if state.stop_failed else "FINISHED")


def trackers_for(cfg, out: Path) -> list[Callback]:
    """The tracker callbacks ``cfg`` asks for (rank 0 builds them)."""
    made = {"tensorboard": lambda: TensorBoard(out / "tensorboard", cfg.logging_steps),
            "wandb": lambda: WandB(cfg, out, cfg.logging_steps), "mlflow": lambda: MLflow(cfg, cfg.logging_steps)}
    return [made[name]() for name in _wanted(cfg)]
