"""A tiny vision-language model fine-tuned end to end through the command line (slow): an Axolotl-style config
(processor_type, chat_template, a regex over the language model's layers) on image files beside a JSONL file,
`lowbit train`, `lowbit generate --image` with the adapter, `lowbit merge`; transformers loads the merged folder and
the merged model answers as the adapter did."""

import json
import random
import subprocess
import sys

import pytest
import yaml
from tiny_vlm import save_tiny_vlm

from lowbit.data.shapes import COLOURS, KINDS, SHAPES_QUESTION, SIZES, shape_image

pytestmark = pytest.mark.slow


def _lowbit(*args):
    p = subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _data(folder, n, seed):
    """``n`` shape pictures saved as PNG files and a JSONL file naming them by relative path."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for i in range(n):
        colour, kind, size = rng.choice(list(COLOURS)), rng.choice(KINDS), rng.choice(list(SIZES))
        (folder / "images" / f"{i}.png").write_bytes(shape_image(colour, kind, size, rng))
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"images/{i}.png"},
                                         {"type": "text", "text": SHAPES_QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"A {size} {colour} {kind}."}]}]})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder / "train.jsonl"


def test_vision_train_generate_merge(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = tmp_path / "model"
    save_tiny_vlm(model, "qwen2_vl")
    data = _data(tmp_path / "data", 96, 0)
    run = tmp_path / "run"
    config = {"base_model": str(model), "processor_type": "AutoProcessor", "skip_prepare_dataset": True,
              "remove_unused_columns": False, "sample_packing": False, "chat_template": "qwen2_vl",
              "datasets": [{"path": str(data), "type": "chat_template"}], "val_set_size": 0.125,
              "output_dir": str(run), "adapter": "qlora", "load_in_4bit": True, "sequence_len": 256,
              "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0,
              "lora_target_modules": r"model.language_model.layers.[\d]+.(mlp|self_attn).(up|down|gate|q|k|v|o)_proj",
              "micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 24, "learning_rate": 3e-3,
              "warmup_steps": 2, "eval_steps": 12, "optimizer": "adamw_torch", "lr_scheduler": "cosine",
              "gradient_checkpointing": True, "compute_dtype": "float32", "freeze_mm_modules": True}
    (tmp_path / "vlm.yaml").write_text(yaml.safe_dump(config))
    _lowbit("train", tmp_path / "vlm.yaml", "--quiet")
    evals = [r["eval_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if r.get("eval_loss") is not None]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    targets = json.loads((run / "adapter_config.json").read_text())["target_modules"]
    assert targets and "visual" not in json.dumps(targets)
    assert (run / "preprocessor_config.json").is_file()  # the adapter folder reads back as the processor

    picture = tmp_path / "data" / "images" / "0.png"
    args = ["--max-new-tokens", 8, "--image", picture, "--prompt", SHAPES_QUESTION, "--compute-dtype", "float32"]
    with_adapter = _lowbit("generate", "--model", model, "--adapter", run, *args)
    assert with_adapter.strip()
    merged = tmp_path / "merged"
    _lowbit("merge", "--model", model, "--adapter", run, "--out", merged, "--dtype", "fp32",
            "--compute-dtype", "float32")
    assert AutoModelForImageTextToText.from_pretrained(merged).config.model_type == "qwen2_vl"
    from_merged = _lowbit("generate", "--model", merged, "--no-quantize", *args)
    assert from_merged == with_adapter
    assert _lowbit("generate", "--model", model, *args) != with_adapter  # the base alone answers otherwise
