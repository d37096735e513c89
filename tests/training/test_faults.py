"""Faults a run must survive: a second run into the same output_dir, kill -9 at chosen moments (one during a
checkpoint write), a full disk, a run too big for the machine, running out of memory mid-run."""

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lowbit import cli
from lowbit.io.adapters import read_adapter
from lowbit.runlock import RunLock
from lowbit.training import loss as loss_mod

WORKER = Path(__file__).with_name("fault_worker.py")


def _config(setup, path: Path, out: Path, **kw) -> Path:
    _, model_dir, data = setup
    cfg = dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
               lora_dropout=0.0, micro_batch_size=4, sequence_len=64, max_steps=8, learning_rate=3e-3,
               warmup_steps=0, eval_steps=4, save_steps=2, val_set_size=8, output_dir=str(out))
    cfg.update(kw)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def _worker(opts: dict, *args, timeout=300):
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.run([sys.executable, str(WORKER), json.dumps(opts), "--", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _same_run(a: Path, b: Path):
    la, lb = _losses(a), _losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb], (la, lb)  # every step once, in order
    assert all(x == pytest.approx(y, rel=1e-5) for (_, x), (_, y) in zip(la, lb)), (la, lb)
    ta, tb = read_adapter(a)[1], read_adapter(b)[1]
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6, rtol=0) for k in ta)


def _no_temporaries(out: Path):
    left = [p.name for folder in (out, out / "checkpoints") if folder.is_dir() for p in folder.iterdir()
            if ".tmp-" in p.name or ".old-" in p.name]
    assert not left, left


def test_a_second_run_is_refused_naming_the_holder(setup, tmp_path, capsys):
    out = tmp_path / "busy"
    cfg = _config(setup, tmp_path / "c.yaml", out, max_steps=2)
    assert cli.main(["train", str(cfg), "--quiet"]) == 0
    files = lambda: {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".lowbit.lock"}
    before = files()
    with RunLock(out):  # another run holds the folder
        assert cli.main(["train", str(cfg), "--overwrite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"another run is using this output_dir (pid {os.getpid()} on {socket.gethostname()}" in err, err
    assert files() == before, "--overwrite must not touch a folder another run holds"


def test_kill_9_leaves_no_stale_lock(tmp_path):
    code = f"from lowbit.runlock import RunLock; import time; RunLock({str(tmp_path)!r}).__enter__(); " \
           "print('locked', flush=True); time.sleep(120)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    p.kill()
    p.wait()
    with RunLock(tmp_path):
        pass


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "reference"
    assert cli.main(["train", str(_config(setup, root / "ref.yaml", out)), "--quiet"]) == 0
    return out


def test_kill_9_at_chosen_moments_then_resume_equals_the_uninterrupted_run(setup, reference, tmp_path):
    out = tmp_path / "killed"
    cfg = _config(setup, tmp_path / "c.yaml", out)
    rng = random.Random(0)  # three moments, one of them in the middle of a checkpoint write
    moments = sorted([(rng.choice([2, 3]), "forward"), (6, "checkpoint"), (rng.choice([7, 8]), "optimizer")])
    for i, (step, phase) in enumerate(moments):
        p = _worker({"kill": [step, phase]}, "train", str(cfg), "--quiet", *(["--resume"] if i else []))
        assert p.returncode == -9, (step, phase, p.stderr[-2000:])
        if phase == "checkpoint":  # the cut write is left behind; the next run must clean it up and ignore it
            assert any(".tmp-" in x.name for x in (out / "checkpoints").iterdir())
    p = _worker({}, "train", str(cfg), "--quiet", "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    _same_run(out, reference)
    _no_temporaries(out)


def test_a_full_disk_fails_cleanly_and_the_run_resumes_when_space_returns(setup, tmp_path):
    out, ref = tmp_path / "full", tmp_path / "ref"
    kw = dict(max_steps=4, lr_scheduler="constant")  # constant: stopping at 2 and going on to 4 computes the same
    assert cli.main(["train", str(_config(setup, tmp_path / "r.yaml", ref, **kw)), "--quiet"]) == 0
    cfg = _config(setup, tmp_path / "c.yaml", out, **{**kw, "max_steps": 2})
    assert _worker({}, "train", str(cfg), "--quiet").returncode == 0
    step2 = {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-0000002").iterdir()}
    cfg = _config(setup, tmp_path / "c.yaml", out, **kw)
    p = _worker({"fsize": 20_000}, "train", str(cfg), "--quiet", "--resume")  # the step-4 checkpoint cannot be written
    err = p.stderr.strip()
    assert p.returncode == 2 and err.startswith("error: ") and err.count("\n") == 0, err
    assert "step-0000004: could not write (File too large" in err and "unchanged" in err, err
    assert {p.name: p.read_bytes() for p in (out / "checkpoints" / "step-0000002").iterdir()} == step2
    assert not (out / "checkpoints" / "step-0000004").exists()
    _no_temporaries(out)
    p = _worker({}, "train", str(cfg), "--quiet", "--resume")  # space is back
    assert p.returncode == 0, p.stderr[-2000:]
    _same_run(out, ref)


def test_a_run_too_big_for_the_machine_is_refused_with_the_cheapest_change(setup, tmp_path, monkeypatch, capsys):
    from lowbit.training import preflight
    from lowbit.training.config import load_config

    cfg_file = _config(setup, tmp_path / "c.yaml", tmp_path / "big", max_steps=1, sequence_len=64,
                       micro_batch_size=16)
    cfg = load_config(cfg_file)
    need = preflight._need(cfg, 1, 1)
    first, said = next(preflight.cheaper(cfg))  # gradient checkpointing: the cheapest change
    fits = preflight._need(first, 1, 1)
    assert fits < need
    monkeypatch.setenv("LOWBIT_MEMORY_LIMIT", f"{int((fits + need) / 2 / 0.95)}B")
    assert cli.main(["train", str(cfg_file), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "this run needs about" in err and "LOWBIT_MEMORY_LIMIT" in err, err
    assert f"it would fit with {said} (or --force to run anyway)" in err, err
    assert not (tmp_path / "big" / "checkpoints").exists(), "refused before anything was loaded or written"
    assert cli.main(["train", str(cfg_file), "--quiet", "--force"]) == 0


def test_preflight_offloads_the_checkpoints_before_it_shortens_the_rows():
    from lowbit.training import preflight
    from lowbit.training.config import TrainConfig

    cfg = TrainConfig(base_model="smollm2-135m", gradient_checkpointing=True, micro_batch_size=1,
                      optimizer="paged_adamw_8bit", sequence_len=4096)
    for device, offload in (("cpu", "offload_disk"), ("cuda", "offload")):
        steps = list(preflight.cheaper(cfg, device))
        assert steps[0][0].gradient_checkpointing == offload and steps[0][1] == f"gradient_checkpointing: {offload}"
        assert steps[1][0].sequence_len == 2048 and steps[1][0].gradient_checkpointing == offload


def test_running_out_of_memory_mid_run_keeps_the_last_checkpoint(setup, tmp_path, monkeypatch, capsys):
    real, calls = loss_mod.lm_loss, {"n": 0}

    def oom(model, batch, *a, **k):
        calls["n"] += torch.is_grad_enabled()
        if calls["n"] == 3:  # step 3 (one micro-batch a step)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, *a, **k)

    monkeypatch.setattr(loss_mod, "lm_loss", oom)
    out = tmp_path / "oom"
    assert cli.main(["train", str(_config(setup, tmp_path / "c.yaml", out)), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "out of memory in step 3: it would fit with" in err or "out of memory in step 3: even" in err, err
    assert "step-0000002, is kept" in err, err
    assert (out / "checkpoints" / "step-0000002" / "adapter_model.safetensors").exists()
