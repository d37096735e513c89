"""Configs in the shapes of Axolotl's own examples (written here with the keys and values those carry: qlora-1b,
mistral qlora, gemma3, llama-2 8-bit lora, qwen3 with thinking, falcon-h1), each trained for a few steps by
`lowbit train` as written — only the model and the data paths are local. bench/axolotl_examples.py runs Axolotl's
real files the same way."""

import json

import pytest
import yaml

from lowbit import cli
from lowbit.io.adapters import read_adapter

from tiny import save_tiny_with_tokenizer

COMMON = """
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
dataset_prepared_path: last_run_prepared
resume_from_checkpoint:
logging_steps: 1
tf32: false
bf16: auto
"""

CONFIGS = {
    "llama3-qlora": """
load_in_8bit: false
load_in_4bit: true
adapter: qlora
datasets:
  - path: {alpaca}
    type: alpaca
val_set_size: 0.1
sequence_len: 256
sample_packing: true
eval_sample_packing: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: [gate_proj, down_proj, up_proj, q_proj, v_proj, k_proj, o_proj]
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 2e-4
gradient_checkpointing: true
attn_implementation: flash_attention_2
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  pad_token: "<|end_of_text|>"
""",
    "mistral-qlora": """
model_type: MistralForCausalLM
tokenizer_type: LlamaTokenizer
load_in_4bit: true
adapter: qlora
datasets:
  - path: {alpaca}
    type: alpaca
val_set_size: 0.1
sequence_len: 512
sample_packing: true
pad_to_sequence_len: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_target_modules: [gate_proj, down_proj, up_proj, q_proj, v_proj, k_proj, o_proj]
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
gradient_checkpointing: true
flash_attention: true
plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
lora_mlp_kernel: true
lora_qkv_kernel: true
lora_o_kernel: true
warmup_steps: 2
evals_per_epoch: 2
saves_per_epoch: 1
special_tokens:
  bos_token: "<|im_start|>"
  eos_token: "<|im_end|>"
  unk_token: "<|endoftext|>"
""",
    "gemma3-qlora": """
ddp_find_unused_parameters: true
load_in_4bit: true
chat_template: gemma3
eot_tokens:
  - <end_of_turn>
datasets:
  - path: {sharegpt}
    type: chat_template
    split: train[:50%]
    field_messages: conversations
    message_property_mappings:
      role: from
      content: value
val_set_size: 0.0
unfrozen_parameters:
  - ^model.language_model.*
  - ^lm_head.*
adapter: qlora
lora_r: 8
lora_alpha: 16
lora_dropout: 0
lora_target_linear: true
sequence_len: 256
sample_packing: true
eval_sample_packing: false
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_torch_fused
lr_scheduler: cosine
learning_rate: 1e-4
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
warmup_ratio: 0.1
evals_per_epoch:
saves_per_epoch: 1
""",
    "llama2-8bit-lora": """
load_in_8bit: true
load_in_4bit: false
adapter: lora
lora_model_dir:
datasets:
  - path: {alpaca}
    type: alpaca
val_set_size: 0.05
sequence_len: 256
sample_packing: true
lora_r: 8
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 2
optimizer: adamw_bnb_8bit
lr_scheduler: constant_with_warmup
learning_rate: 0.0002
group_by_length: false
gradient_checkpointing: true
warmup_steps: 2
evals_per_epoch: 4
saves_per_epoch: 1
use_tensorboard: true
""",
    "qwen3-thinking": """
adapter: qlora
load_in_4bit: true
chat_template: qwen3
chat_template_kwargs:
  enable_thinking: false
datasets:
  - path: {thinking}
    type: chat_template
    field_messages: messages
    field_thinking: thinking
    template_thinking_key: reasoning_content
    roles:
      system: [system]
      user: [user]
      assistant: [assistant]
val_set_size: 0.1
sequence_len: 256
lora_r: 8
lora_alpha: 16
lora_target_modules: [q_proj, k_proj, v_proj, o_proj]
lora_modules_to_save: [embed_tokens, lm_head]
peft:
  loftq_config:
    loftq_bits: 4
micro_batch_size: 2
gradient_accumulation_steps: 1
num_epochs: 1
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 2e-5
warmup_steps: 1
""",
    # examples/mistral/orpo/mistral-qlora-orpo.yml
    "mistral-qlora-orpo": """
load_in_8bit: false
load_in_4bit: true
rl: orpo
orpo_alpha: 0.1
remove_unused_columns: false
chat_template: chatml
datasets:
  - path: {argilla}
    type: chat_template.argilla
val_set_size: 0.1
adapter: qlora
lora_model_dir:
sequence_len: 256
sample_packing: false
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_target_modules: [gate_proj, down_proj, up_proj, q_proj, v_proj, k_proj, o_proj]
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
gradient_checkpointing: true
attn_implementation: flash_attention_2
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
""",
    # examples/mistral/dpo/mistral-dpo-qlora.yml
    "mistral-dpo-qlora": """
load_in_8bit: false
load_in_4bit: true
chat_template: chatml
rl: dpo
datasets:
  - path: {dpo_messages}
    type: chat_template.default
    field_messages: conversation
    field_chosen: chosen
    field_rejected: rejected
    message_property_mappings:
      role: role
      content: content
val_set_size: 0.05
sequence_len: 256
sample_packing: false
adapter: qlora
lora_model_dir:
lora_r: 8
lora_alpha: 16
lora_dropout: 0.2
lora_target_linear: true
lora_target_modules: [gate_proj, down_proj, up_proj, q_proj, v_proj, k_proj, o_proj]
lora_modules_to_save:
 - embed_tokens
 - lm_head
gradient_accumulation_steps: 4
micro_batch_size: 4
num_epochs: 6
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0001
gradient_checkpointing: true
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  bos_token: "<|im_start|>"
  eos_token: "<|im_end|>"
""",
    # examples/llama-3/qlora-1b-kto.yaml
    "llama3-qlora-kto": """
load_in_8bit: false
load_in_4bit: true
rl: kto
rl_beta: 0.5
kto_desirable_weight: 0.2
datasets:
  - path: {kto}
    type: llama3.ultra
    split: train
val_set_size: 0.0
remove_unused_columns: false
adapter: qlora
lora_model_dir:
sequence_len: 256
sample_packing: false
eval_sample_packing: false
pad_to_sequence_len: false
lora_r: 32
lora_alpha: 64
lora_dropout: 0.05
lora_target_linear: true
gradient_accumulation_steps: 1
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
attn_implementation: flash_attention_2
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  pad_token: "<|end_of_text|>"
""",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl-shapes")
    rows = {
        "alpaca": [{"instruction": f"what is {i} plus {i}?", "input": "", "output": f"{2 * i}"} for i in range(60)],
        "sharegpt": [{"conversations": [{"from": "human", "value": f"capital of france {i}?"},
                                        {"from": "gpt", "value": "paris"}]} for i in range(60)],
        "thinking": [{"messages": [{"role": "user", "content": f"{i}+{i}?"},
                                   {"role": "assistant", "content": f"{2 * i}", "thinking": "add"}]}
                     for i in range(60)],
        # the shapes of argilla/ultrafeedback-binarized-preferences-cleaned (+ its -kto variant) and
        # olivermolenschot/alpaca_messages_dpo_test
        "argilla": [{"prompt": f"{i}+{i}?", "chosen": [{"role": "user", "content": f"{i}+{i}?"},
                                                       {"role": "assistant", "content": f"{2 * i}"}],
                     "rejected": [{"role": "user", "content": f"{i}+{i}?"},
                                  {"role": "assistant", "content": f"{3 * i + 1}"}]} for i in range(60)],
        "kto": [{"prompt": f"{i}+{i}?", "completion": f"{2 * i if i % 2 else 3 * i + 1}", "label": i % 2 == 1}
                for i in range(60)],
        "dpo_messages": [{"conversation": [{"role": "user", "content": f"{i}+{i}?"}],
                          "chosen": {"role": "assistant", "content": f"{2 * i}"},
                          "rejected": {"role": "assistant", "content": f"{3 * i + 1}"}} for i in range(60)],
    }
    out = {}
    for name, rs in rows.items():
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rs))
    save_tiny_with_tokenizer(root / "model")
    return root, out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_axolotl_shaped_config_trains_as_written(files, name, tmp_path, capsys):
    root, data = files
    text = f"base_model: {root / 'model'}\noutput_dir: {tmp_path / 'out'}\n" + COMMON + \
        CONFIGS[name].format(**{k: str(v) for k, v in data.items()})
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    assert cli.main(["train", str(cfg), "--max-steps", "2", "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "Axolotl keys translated:" in out and (tmp_path / "out" / "adapter_model.safetensors").exists()
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["max_steps"] == 2
    if name == "llama2-8bit-lora":
        assert saved["load_in_8bit"] and not saved["load_in_4bit"] and (tmp_path / "out" / "tensorboard").is_dir()
    rl = {"mistral-qlora-orpo": "orpo", "mistral-dpo-qlora": "dpo", "llama3-qlora-kto": "kto"}.get(name)
    if rl:
        assert saved["rl"] == rl and "rewards/chosen" in (tmp_path / "out" / "metrics.jsonl").read_text()
    if name == "qwen3-thinking":
        cfg_ = read_adapter(tmp_path / "out")[0]
        assert saved["lora_init"] == "loftq" and set(cfg_["modules_to_save"]) == {"lm_head", "model.embed_tokens"}


def test_falcon_h1_shaped_config_trains_and_peft_loads_its_adapter(files, tmp_path, capsys):
    """A hybrid attention / Mamba model: the example's targets (in_proj, never the mixer's out_proj)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, data = files
    model = tmp_path / "falcon-h1"
    save_tiny_with_tokenizer(model, "falcon_h1")
    cfg = tmp_path / "falcon-h1.yml"
    cfg.write_text(f"base_model: {model}\noutput_dir: {tmp_path / 'out'}\nchat_template: falcon_h1\n" + COMMON + f"""
adapter: lora
load_in_4bit: false
datasets:
  - path: {data['sharegpt']}
    type: chat_template
    field_messages: conversations
    message_property_mappings: {{role: from, content: value}}
lora_r: 8
lora_alpha: 16
lora_target_linear: true
sequence_len: 128
micro_batch_size: 2
learning_rate: 1e-3
""")
    assert cli.main(["train", str(cfg), "--max-steps", "2", "--quiet", "--compute-dtype", "float32"]) == 0, \
        capsys.readouterr().err
    adapter = read_adapter(tmp_path / "out")[0]
    assert "in_proj" in adapter["target_modules"] and "out_proj" not in adapter["target_modules"]
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    PeftModel.from_pretrained(base, tmp_path / "out")  # peft refuses out_proj in Mamba models; this loads
