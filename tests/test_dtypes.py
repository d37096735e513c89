"""Compute dtypes: the default follows the CPU's matrix instructions, and a 16-bit type the CPU cannot multiply in
hardware is said in one line where a run starts (training, and the commands that load a model)."""

import json

import pytest
import torch

from lowbit import cli, dtypes
from lowbit.training import recipe
from lowbit.training.config import TrainConfig

AVX2 = "flags\t\t: fpu sse sse2 avx fma f16c avx2\n"
AMX = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


@pytest.fixture
def cpu(monkeypatch):
    def use(flags: str):
        monkeypatch.setattr(dtypes, "_cpu_flags", lambda: flags)
    return use


def test_default_dtype_and_the_note_follow_the_cpu_flags(cpu):
    cpu(AVX2)
    assert dtypes.default_compute_dtype() == torch.float32 and dtypes.default_compute_dtype_name() == "float32"
    note = dtypes.slow_on_cpu(torch.bfloat16)
    assert "avx512_bf16 or amx_bf16" in note and "picks float32" in note and "\n" not in note
    assert "avx512_fp16 or amx_fp16" in dtypes.slow_on_cpu(torch.float16)
    assert dtypes.slow_on_cpu(torch.float32) is None
    cpu(AMX)
    assert dtypes.default_compute_dtype() == torch.bfloat16
    assert dtypes.slow_on_cpu(torch.bfloat16) is None
    assert dtypes.slow_on_cpu(torch.float16) is not None  # bf16 units do not multiply float16


def test_training_in_bfloat16_on_a_cpu_without_it_says_so_once(setup, cpu):
    root, model_dir, data = setup
    cfg = dict(base_model=str(model_dir), datasets=str(data), lora_r=4, lora_alpha=8, micro_batch_size=4,
               sequence_len=64, max_steps=1, val_set_size=0, save_steps=0, compile=False)
    for flags, dtype, expected in [(AVX2, "bfloat16", 1), (AMX, "bfloat16", 0), (AVX2, "float32", 0)]:
        cpu(flags)
        lines = []
        recipe.train(TrainConfig(**cfg, compute_dtype=dtype, output_dir=str(root / f"dt-{dtype}-{expected}")),
                     progress=False, log=lines.append)
        assert sum("no bfloat16 matrix instructions" in str(x) for x in lines) == expected, lines


def test_commands_that_load_a_model_say_it_on_stderr_and_keep_stdout_clean(setup, cpu, capsys):
    _, model_dir, data = setup
    cpu(AVX2)
    rc = cli.main(["eval", "--base-model", str(model_dir), "--datasets", str(data), "--compute-dtype", "bf16",
                   "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["loss"] > 0
    assert "compute_dtype bfloat16: this CPU has no bfloat16 matrix instructions" in err
