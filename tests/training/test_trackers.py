"""Experiment trackers through their real packages, offline: TensorBoard event files, a Weights & Biases offline run
(read back from its .wandb file with wandb's own record definitions), an MLflow file store."""

import glob
import importlib.util
import json
import struct

import pytest

from lowbit.errors import LowbitError
from lowbit.training import recipe
from lowbit.training.config import TrainConfig


def _train(setup, out, **kw):
    _, model, data = setup
    cfg = TrainConfig(base_model=str(model), datasets=str(data), compute_dtype="float32", lora_r=4, micro_batch_size=4,
                      sequence_len=64, max_steps=3, learning_rate=3e-3, warmup_steps=0, eval_steps=3, save_steps=3,
                      val_set_size=4, output_dir=str(out), **kw)
    return recipe.train(cfg, progress=False, log=lambda *a: None)


def _wandb_history(run_file: str) -> list[dict]:
    """The history records of a .wandb file (LevelDB-style log blocks of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf, out = open(run_file, "rb").read(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        payload, pos = data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        buf = payload if kind in (1, 2) else buf + payload
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return out


def test_wandb_offline_run_holds_the_metrics(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _train(setup, out, wandb_project="lowbit-test", wandb_name="tiny", wandb_run_id="abc123")
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*-abc123" / "run-abc123.wandb"))
    history = _wandb_history(run_file)
    steps = [h["_step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3] and all(h["loss"] > 0 for h in history if "loss" in h)
    assert "eval_loss" in history[-1]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["loss"] for h in history if "loss" in h] == pytest.approx(logged)


def test_mlflow_file_store_holds_the_metrics(setup, tmp_path):
    from mlflow.tracking import MlflowClient

    out, store = tmp_path / "run", tmp_path / "mlruns"
    _train(setup, out, mlflow_tracking_uri=f"file:{store}", mlflow_experiment_name="lowbit-test",
           mlflow_run_name="tiny")
    client = MlflowClient(tracking_uri=f"file:{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("lowbit-test").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED" and run.data.params["lora_r"] == "4"
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(logged)


def test_tensorboard_events(setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    _train(setup, out, tensorboard=True)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3] and "eval_loss" in acc.Tags()["scalars"]


def test_a_tracker_that_is_not_installed_is_one_line(setup, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(LowbitError, match=r"wandb is asked for \(wandb_… keys\) but not installed: pip install "
                                          r"'lowbit\[trackers\]'") as e:
        _train(setup, tmp_path / "run", wandb_project="x")
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()  # refused before anything was written
