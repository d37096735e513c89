"""The run's device: nothing of a run may be made on an implicit device, the device setting, offloaded checkpoints,
the paged optimizer's budget on a GPU.

The whole-run test puts ``torch.set_default_device("meta")`` in force while the run computes on the CPU: any tensor
created without an explicit device lands on meta and the run fails — what would silently stay on the CPU on a GPU.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from lowbit import cli
from lowbit.errors import LowbitError
from lowbit.training import recipe
from lowbit.training.config import TrainConfig, apply_overrides
from lowbit.training.device import resolve_device
from lowbit.training.offload import DiskOffload, HostOffload, disk_note
from lowbit.training.optimizer import PAGED_FREE_SHARE, page_budget


def _cfg(setup, out, **kw):
    root, model_dir, data = setup
    base = dict(base_model=str(model_dir), datasets=str(data), compute_dtype="float32", lora_r=4, lora_alpha=8,
                micro_batch_size=4, sequence_len=64, max_steps=4, learning_rate=3e-3, warmup_steps=0,
                eval_steps=2, save_steps=2, val_set_size=8, output_dir=str(root / out), device="cpu",
                lr_scheduler="constant")  # the same rates whether a run is told 2 steps or 4
    base.update(kw)
    return TrainConfig(**base)


class meta_default:
    def __enter__(self):
        torch.set_default_device("meta")

    def __exit__(self, *exc):
        torch.set_default_device(None)


def _losses(out):
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [
    dict(),
    dict(optimizer="paged_adamw_8bit", sample_packing=True, gradient_checkpointing="offload", lora_dropout=0.1),
    dict(load_in_4bit=False, load_in_8bit=True, lora_modules_to_save=["lm_head"], max_grad_norm=0.0),
], ids=["nf4", "paged-packed-offload", "int8-saved-head"])
def test_whole_run_makes_nothing_on_an_implicit_device(setup, extra, tmp_path):
    root = setup[0]
    name = "meta-" + ("-".join(extra) or "plain")
    ref = recipe.train(_cfg(setup, name + "-ref", **extra), progress=False, log=lambda *a: None)
    with meta_default():
        res = recipe.train(_cfg(setup, name, max_steps=2, **extra), progress=False, log=lambda *a: None)
        assert res["steps"] == 2
        res = recipe.train(_cfg(setup, name, **extra), resume=True, progress=False, log=lambda *a: None)
        out = root / name
        args = ["--model", str(setup[1]), "--adapter", str(out), "--device", "cpu"]
        assert cli.main(["merge", *args, "--out", str(tmp_path / "merged")]) == 0
        assert cli.main(["eval", *args, "--data", str(setup[2])]) == 0
        assert cli.main(["generate", *args, "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    assert res["steps"] == 4
    # made under meta-by-default, the run is the same run: resumed at step 2, equal to the uninterrupted reference
    assert _losses(out) == pytest.approx(_losses(root / (name + "-ref")), rel=1e-5, abs=1e-6)
    assert res["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5)
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_export_makes_nothing_on_an_implicit_device(setup, tmp_path):
    with meta_default():
        assert cli.main(["export", "--model", str(setup[1]), "--out", str(tmp_path / "m.gguf"), "--type", "f32",
                         "--device", "cpu"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0


def test_device_setting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LowbitError, match=r"device: cuda:1, but PyTorch sees no CUDA GPU"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)  # under torchrun: the rank's GPU
    assert resolve_device("cuda", world_size=2) == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(LowbitError, match="device: cuda:2, but there are 2 GPUs"):
        resolve_device("cuda:2")
    with pytest.raises(LowbitError, match="config: device must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        TrainConfig(base_model="x", datasets="y", device="gpu").validate()


def test_cuda_run_on_a_machine_without_one_is_one_line(setup, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg(setup, "no-gpu", device="cuda")
    with pytest.raises(LowbitError, match="PyTorch sees no CUDA GPU here"):
        recipe.train(cfg, progress=False, log=lambda *a: None)


def _tiny_lm(gc: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    if gc:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    return m


def test_offloaded_checkpoints_give_the_same_gradients():
    """The hooks see every checkpointed layer's input (batch × seq × hidden each), and the gradients through host
    copies equal plain checkpointing's bit for bit."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for offload in (False, True):
        m = _tiny_lm(gc=True)
        hooks = HostOffload("cpu", min_bytes=0)
        shapes = []
        pack = hooks.pack_hook
        hooks.pack_hook = lambda t: (shapes.append(tuple(t.shape)), pack(t))[1]
        ctx = hooks if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with ctx:
            loss = m(ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        if offload:
            assert sum(s == (2, 16, 32) for s in shapes) >= 3  # at least one hidden-state input per layer
            assert hooks.moved > 3 * 2 * 16 * 32 * 4
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_offload_leaves_small_tensors_and_parameters_alone():
    hooks = HostOffload("cpu", min_bytes=1 << 20)
    w = torch.nn.Parameter(torch.randn(1024, 512))
    small = torch.randn(8, requires_grad=True)
    big = torch.randn(1024, 512, requires_grad=True)
    assert hooks.pack_hook(w) is w and hooks.pack_hook(small) is small and hooks.moved == 0
    packed = hooks.pack_hook(big)
    assert packed is not big and hooks.moved == big.numel() * 4
    assert torch.equal(hooks.unpack_hook(packed), big)


def test_offload_on_cpu_says_it_is_plain_checkpointing(setup):
    said = []
    res = recipe.train(_cfg(setup, "offload", gradient_checkpointing="offload", max_steps=2, val_set_size=0),
                       progress=False, log=said.append)
    assert res["steps"] == 2
    assert any("gradient_checkpointing: offload — on the CPU the host is the device" in s for s in said)


def test_axolotl_activation_offloading():
    cfg = apply_overrides(TrainConfig(), {"gradient_checkpointing": True, "activation_offloading": True})
    assert cfg.gradient_checkpointing == "offload"
    cfg = apply_overrides(TrainConfig(), {"activation_offloading": "legacy"})
    assert cfg.gradient_checkpointing == "offload"
    cfg = apply_overrides(TrainConfig(), {"fsdp_config": {"activation_checkpointing": True},
                                          "activation_offloading": True, "fsdp_version": 2})
    assert cfg.gradient_checkpointing == "offload"
    assert apply_overrides(TrainConfig(), {"activation_offloading": False}).gradient_checkpointing is False
    with pytest.raises(LowbitError, match="activation_offloading needs gradient_checkpointing, which is false"):
        apply_overrides(TrainConfig(), {"gradient_checkpointing": False, "activation_offloading": True})
    assert apply_overrides(TrainConfig(), {"activation_offloading": "disk"}).gradient_checkpointing == "offload_disk"
    cfg = apply_overrides(TrainConfig(), {"gradient_checkpointing": True, "activation_offloading": "disk"})
    assert cfg.gradient_checkpointing == "offload_disk" and cfg.checkpointing
    assert apply_overrides(TrainConfig(), {"gradient_checkpointing": "offload_disk"}).gradient_checkpointing == \
        "offload_disk"  # Axolotl's older spelling


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_disk_offloaded_checkpoints_give_the_same_gradients(tmp_path):
    """offload_disk: every checkpointed layer's input goes to a file and comes back; the gradients equal plain
    checkpointing's bit for bit, and the files are gone once backward has run."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for offload in (False, True):
        m = _tiny_lm(gc=True)
        hooks = DiskOffload(str(tmp_path), min_bytes=0)
        files = _open_files()
        ctx = hooks if offload else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with ctx:
            loss = m(ids, labels=ids).loss
        if offload:
            assert hooks.moved > 3 * 2 * 16 * 32 * 4  # at least one hidden-state input per layer
            assert _open_files() > files + 3 and os.listdir(tmp_path) == []  # open, but unlinked
        loss.backward()
        del loss
        assert _open_files() == files
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_disk_offload_round_trips_every_dtype_and_leaves_small_tensors_alone():
    hooks = DiskOffload(min_bytes=1 << 20)
    w = torch.nn.Parameter(torch.randn(1024, 512))
    strided = torch.randn(512, 1024).t()
    assert hooks.pack_hook(w) is w and hooks.pack_hook(strided) is strided and hooks.moved == 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        big = (torch.randn(2048, 513) * 100).to(dtype)  # ≥ 1 MiB even as bool
        packed = hooks.pack_hook(big)
        assert not isinstance(packed, torch.Tensor)
        for _ in range(2):  # autograd may unpack a saved tensor more than once (retain_graph)
            back = hooks.unpack_hook(packed)
            assert back.dtype == dtype and back.shape == big.shape and torch.equal(back, big)


def test_disk_offload_that_cannot_write_says_so_in_one_line(tmp_path):
    m, ids = _tiny_lm(gc=True), torch.randint(0, 64, (2, 16))
    with pytest.raises(LowbitError, match=r"offload_disk could not write [0-9,]+ bytes under .*missing: No such file "
                                          r"or directory — free disk space there, point TMPDIR elsewhere") as e:
        with DiskOffload(str(tmp_path / "missing"), min_bytes=0):
            m(ids, labels=ids)
    assert "\n" not in str(e.value)


def test_offload_disk_trains_as_plain_checkpointing(setup):
    said = []
    runs = [recipe.train(_cfg(setup, f"disk-{gc}", gradient_checkpointing=gc, max_steps=3, val_set_size=0),
                         progress=False, log=said.append) for gc in (True, "offload_disk")]
    assert runs[1]["steps"] == 3
    losses = [_losses(setup[0] / f"disk-{gc}") for gc in (True, "offload_disk")]
    assert losses[0] == losses[1]
    assert any(s.startswith("gradient_checkpointing: offload_disk — checkpoints wait in files under") for s in said)


def test_disk_note_says_when_the_folder_is_in_memory():
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    for m in [m[1] for m in mounts if m[2] == "tmpfs" and os.access(m[1], os.R_OK)][:1]:
        assert disk_note(m).endswith(f"under {Path(m).resolve()} (tmpfs: in memory, so this saves none; set TMPDIR "
                                     "to a folder on disk)")
    here = Path(__file__).resolve().parent  # the checkout: on disk
    assert disk_note(str(here)) == f"gradient_checkpointing: offload_disk — checkpoints wait in files under {here}"


def test_paged_budget_on_a_gpu_takes_a_share_of_free_memory():
    two_pages = page_budget("paged_adamw", 0, None)
    assert two_pages == 0  # the optimizer's own default (two pages) on the CPU
    free = 80 * 2**30
    assert page_budget("paged_adamw", 0, free) == int(free * PAGED_FREE_SHARE)
    assert page_budget("paged_adamw", 3.0, free) == 3 * 2**20  # an explicit budget wins
    assert page_budget("adamw", 0, free) == 0  # not paged
    from lowbit.optim import OPTIMIZERS

    assert page_budget("paged_adamw_8bit", 0, 1000) == OPTIMIZERS["paged_adamw_8bit"].default_budget_bytes()


def test_planner_moves_offloaded_checkpoints_to_the_host():
    from lowbit.planner.memory import plan

    kw = dict(sequence_len=2048, micro_batch_size=2, compute_dtype="bfloat16", device="cuda")
    on = plan("llama-2-7b", gradient_checkpointing=True, **kw)
    off = plan("llama-2-7b", gradient_checkpointing="offload", **kw)
    h, layers, tokens = 4096, 32, 4096
    assert on.items["activations"] - off.items["activations"] == tokens * h * layers * 2
    assert off.host_items["checkpoints"] == tokens * h * layers * 2
    assert "checkpoints on host" in off.table()
    cpu = plan("llama-2-7b", gradient_checkpointing="offload", **{**kw, "device": "cpu"})
    assert "checkpoints" not in cpu.host_items  # on the CPU nothing moves
