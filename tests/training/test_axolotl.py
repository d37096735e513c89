"""An Axolotl QLoRA config trains unchanged: its key spellings translate (or are refused in one line), and its
``datasets:`` list of two files in different formats (ShareGPT JSONL, alpaca Parquet) trains with packing."""

import json

import pytest
import yaml

from lowbit import cli
from lowbit.errors import LowbitError
from lowbit.training.config import load_config

AXOLOTL = """\
base_model: {model}
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: {sharegpt}
    type: sharegpt
  - path: {alpaca}
    type: alpaca
dataset_prepared_path:
val_set_size: 0.1
output_dir: {out}
adapter: qlora
lora_model_dir:
sequence_len: 256
sample_packing: true
eval_sample_packing: false
pad_to_sequence_len: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 1
micro_batch_size: 2
num_epochs: 2
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 0.003
train_on_inputs: false
group_by_length: false
bf16: false
fp16: false
tf32: false
gradient_checkpointing: true
resume_from_checkpoint:
logging_steps: 1
flash_attention: false
warmup_steps: 2
evals_per_epoch: 2
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
"""


def _files(tmp_path):
    import pandas as pd

    sg = tmp_path / "sharegpt.jsonl"
    sg.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"capital of france {i}?"},
                                                        {"from": "gpt", "value": "paris"}]}) + "\n"
                          for i in range(24)))
    pd.DataFrame([{"instruction": f"say {i}", "input": "", "output": "said"} for i in range(24)]).to_parquet(
        tmp_path / "alpaca.parquet")
    return sg, tmp_path / "alpaca.parquet"


def test_axolotl_keys_translate(tmp_path):
    sg, alp = _files(tmp_path)
    path = tmp_path / "qlora.yml"
    path.write_text(AXOLOTL.format(model="m", sharegpt=sg, alpaca=alp, out=tmp_path / "out"))
    cfg = load_config(path).validate()
    assert (cfg.load_in_4bit, cfg.lora_target_modules, cfg.optimizer) == (True, "all-linear", "paged_adamw_8bit")
    assert (cfg.evals_per_epoch, cfg.saves_per_epoch, cfg.pad_to_sequence_len, cfg.group_by_length) == (2, 1, True,
                                                                                                        False)
    cfg2 = load_config(_write(tmp_path, {"adapter": "lora", "bf16": "auto", "optimizer": "adamw_torch"}))
    assert (cfg2.load_in_4bit, cfg2.compute_dtype, cfg2.optimizer) == (False, "auto", "adamw")
    assert load_config(_write(tmp_path, {"bf16": True})).compute_dtype == "bfloat16"


def _write(tmp_path, d):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("d,message", [
    ({"load_in_8bit": True, "load_in_4bit": True}, "load_in_8bit and load_in_4bit are both true"),
    ({"adapter": "ia3"}, "adapter: 'ia3' — lowbit trains LoRA adapters"),
    ({"adapter": "qlora", "load_in_4bit": False}, "adapter: qlora needs a 4-bit base"),
    ({"deepspeed": "zero2.json"}, "deepspeed: 'zero2.json' — DeepSpeed is not used"),
    ({"gptq": True}, "gptq: True — GPTQ-quantized bases are not read"),
    ({"relora": True}, "relora: True — ReLoRA is not built in"),
    ({"tokenizer_use_mistral_common": True}, "tokenizer_use_mistral_common: True — mistral-common tokenizers"),
    ({"chat_template": "nosuch"}, "chat_template: unknown template 'nosuch'"),
    ({"chat_template": "jinja"}, "jinja needs the template in chat_template_jinja"),
    ({"special_tokens": {"mask_token": "<m>"}}, "special_tokens: unknown 'mask_token'"),
    ({"plugins": ["axolotl.integrations.kd.KDPlugin"]}, "plugins: 'axolotl.integrations.kd.KDPlugin' — lowbit has no"),
    ({"lr_scheduler": "one_cycle"}, "lr_scheduler: 'one_cycle' — lowbit schedules cosine"),
    ({"warmup_steps": 5, "warmup_ratio": 0.1}, "warmup_steps and warmup_ratio are both set"),
    ({"adam_eps": 1e-5}, "unknown key 'adam_eps' — did you mean 'adam_epsilon'"),
    ({"context_parapllel_size": 2}, "unknown key 'context_parapllel_size' — did you mean 'context_parallel_size'"),
    ({"context_parallel_size": 2}, "context_parallel_size: 2 — context / tensor parallelism is not built in"),
    ({"bf16": "yes"}, "bf16: 'yes' — expects true, false or auto"),
    ({"evals_per_epoch": -1}, "evals_per_epoch must be >= 0"),
    ({"learning_rate": "fast"}, "learning_rate expects a number, got 'fast'"),
])
def test_what_lowbit_does_not_do_is_refused_in_one_line(tmp_path, d, message):
    with pytest.raises(LowbitError, match=message.replace("(", r"\(")) as e:
        load_config(_write(tmp_path, d)).validate()
    assert "\n" not in str(e.value)


def test_axolotl_config_with_two_formats_trains_unchanged(setup, tmp_path, capsys):
    sg, alp = _files(tmp_path)
    path = tmp_path / "qlora.yml"
    out = tmp_path / "out"
    path.write_text(AXOLOTL.format(model=setup[1], sharegpt=sg, alpaca=alp, out=out))
    assert cli.main(["train", str(path), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "(sharegpt, alpaca)" in text and "packed into" in text and "eval_steps = " in text
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) >= 2 and evals[-1] < evals[0], evals
    assert (out / "adapter_model.safetensors").exists()
