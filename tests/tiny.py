"""Tiny random causal LMs built locally from transformers configs (no download)."""

import torch


def tiny_config(arch="llama", **kw):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    common.update(kw)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(arch)


def save_tiny(path, arch="llama", seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    with torch.no_grad():  # larger-than-init weights so the model's outputs are not ~uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": kw.pop("_shard")} if "_shard" in kw else {}))
    return model
