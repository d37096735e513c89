"""A vision-language model through the training loop's guarantees: an interrupted run resumes to the uninterrupted
one's losses, and two DDP ranks equal one process over the same micro-batches (tiny random Qwen2-VL, pictures on
disk)."""

import json
import random

import pytest
from test_distributed import _close, _losses, _torchrun
from tiny_vlm import save_tiny_vlm

from lowbit.data.shapes import COLOURS, KINDS, SHAPES_QUESTION, SIZES, shape_image
from lowbit.errors import LowbitError
from lowbit.training import recipe
from lowbit.training.config import TrainConfig

from tiny import ctrl_c_in_loss


@pytest.fixture(scope="module")
def vlm_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-train")
    save_tiny_vlm(root / "model", "qwen2_vl")
    rng = random.Random(0)
    (root / "images").mkdir()
    rows = []
    for i in range(24):
        c, k, s = rng.choice(list(COLOURS)), rng.choice(KINDS), rng.choice(list(SIZES))
        (root / "images" / f"{i}.png").write_bytes(shape_image(c, k, s, rng))
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "path": f"images/{i}.png"},
                                                               {"type": "text", "text": SHAPES_QUESTION}]},
                                  {"role": "assistant", "content": f"A {s} {c} {k}." + " Yes." * (i % 3)}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(root, out, **kw):
    return dict(dict(base_model=str(root / "model"), datasets=str(root / "data.jsonl"), compute_dtype="float32",
                     lora_r=4, lora_alpha=8, micro_batch_size=2, gradient_accumulation_steps=2, sequence_len=128,
                     max_steps=4, learning_rate=3e-3, warmup_steps=0, eval_steps=4, save_steps=2, val_set_size=4,
                     output_dir=str(out)), **kw)


def test_vision_run_resumes_exactly(vlm_setup, tmp_path, monkeypatch):
    full = tmp_path / "full"
    recipe.train(TrainConfig(**_cfg(vlm_setup, full, max_steps=6)), progress=False, log=lambda *a: None)
    resumed = tmp_path / "resumed"
    # inside step 5 (2 micro-batches a step)
    with ctrl_c_in_loss(monkeypatch, 9), pytest.raises(LowbitError, match="interrupted at step 4"):
        recipe.train(TrainConfig(**_cfg(vlm_setup, resumed, max_steps=6)), progress=False, log=lambda *a: None)
    recipe.train(TrainConfig(**_cfg(vlm_setup, resumed, max_steps=6)), resume=True, progress=False,
                 log=lambda *a: None)
    assert _close(resumed, full), (_losses(resumed), _losses(full))


def test_vision_two_ranks_equal_one_process(vlm_setup, tmp_path):
    one = tmp_path / "one"
    recipe.train(TrainConfig(**_cfg(vlm_setup, one, gradient_accumulation_steps=4)), progress=False,
                 log=lambda *a: None)
    two = tmp_path / "two"
    p = _torchrun(_cfg(vlm_setup, two, distributed="ddp"), tmp_path / "report")
    assert p.returncode == 0, p.stderr[-3000:]
    assert _close(two, one), (_losses(two), _losses(one))
