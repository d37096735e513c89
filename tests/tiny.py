"""Tiny random causal LMs built locally from transformers configs (no download)."""

import contextlib

import torch

MOE_ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "phimoe", "granitemoe")
HYBRID_ARCHITECTURES = ("falcon_h1", "granitemoehybrid", "nemotron_h", "lfm2")
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2", "gpt_neox",
                 "falcon", "starcoder2", "granite", "smollm3", *HYBRID_ARCHITECTURES, *MOE_ARCHITECTURES)
"""The decoder-only architectures lowbit is tested on (transformers model types): dense, hybrid attention /
state-space (Mamba or short-convolution mixers), then MoE."""


def tiny_config(arch="llama", **kw):
    """A 2-layer, 64-wide config of ``arch`` (a transformers model type); ``kw`` overrides its fields."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    extra = {
        "qwen3": dict(head_dim=16),
        "gemma2": dict(head_dim=16, sliding_window=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "gemma3_text": dict(head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
        "phi3": dict(pad_token_id=0, eos_token_id=2, partial_rotary_factor=0.5, tie_word_embeddings=False),
        "olmo2": dict(pad_token_id=0, eos_token_id=2, tie_word_embeddings=False),
        "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
        "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                          shared_expert_intermediate_size=64, tie_word_embeddings=False),
        "olmoe": dict(num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=2, tie_word_embeddings=False),
        "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=2),
        "gpt_neox": dict(eos_token_id=2, bos_token_id=1, tie_word_embeddings=False),
        "falcon": dict(eos_token_id=2, bos_token_id=1, num_kv_heads=2, new_decoder_architecture=True),
        "starcoder2": dict(eos_token_id=2, bos_token_id=1),
        "smollm3": dict(pad_token_id=0, eos_token_id=2, bos_token_id=1),
        "falcon_h1": dict(mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
                          mamba_expand=1, mamba_chunk_size=16, head_dim=16, pad_token_id=0, eos_token_id=2),
        "granitemoehybrid": dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16,
                                 mamba_d_state=8, mamba_n_groups=1, mamba_expand=1, mamba_chunk_size=16,
                                 num_local_experts=0, shared_intermediate_size=128, pad_token_id=0, eos_token_id=2),
        "nemotron_h": dict(hybrid_override_pattern="M*-", num_hidden_layers=3, mamba_num_heads=4, mamba_head_dim=16,
                           ssm_state_size=8, n_groups=1, chunk_size=16, head_dim=16, pad_token_id=0, eos_token_id=2),
        "lfm2": dict(layer_types=["conv", "full_attention"], conv_L_cache=3, block_ff_dim=128,
                     block_auto_adjust_ff_dim=False, pad_token_id=0, eos_token_id=2),
    }
    if arch == "gpt2":
        gpt2 = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
        gpt2.update({k: v for k, v in kw.items() if k in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions")})
        return tf.GPT2Config(**gpt2)
    if arch not in ARCHITECTURES:
        raise ValueError(arch)
    return tf.AutoConfig.for_model(arch, **{**common, **extra.get(arch, {}), **kw})


def save_tiny(path, arch="llama", seed=0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kw))
    with torch.no_grad():  # larger-than-init weights so the model's outputs are not ~uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True,
                          **({"max_shard_size": kw.pop("_shard")} if "_shard" in kw else {}))
    return model


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_tokenizer(path=None):
    """A byte-level BPE tokenizer with 256 ids and a ChatML template, trained here on a few sentences.
    Like SmolLM2-Instruct, its EOS (<|im_end|>) doubles as the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["what is the capital of france", "the capital of france is paris", "hello how are you today",
              "below is an instruction that describes a task", "### response: the answer is",
              "user assistant system"] * 20
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    if path is not None:
        tok.save_pretrained(path)
    return tok


def tiny_spm_tokenizer(path=None):
    """A LLaMA-2 / Mistral-style tokenizer (byte-fallback BPE over "▁"-joined text, <s> prepended), 390 ids,
    trained here: what SentencePiece models become as transformers fast tokenizers."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    corpus = ["what is the capital of france", "the capital of france is paris", "hello how are you today",
              "mistral and llama use sentencepiece", "numbers like 12345 and 2024"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    spec = json.loads(tk.to_str())  # the 256 byte tokens are ordinary vocabulary after the specials, as in LLaMA's
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])[3:]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    vocab.update({t: 259 + k for k, (t, _) in enumerate(learned)})
    spec["model"]["vocab"] = vocab
    tk = Tokenizer.from_str(json.dumps(spec))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", tk.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = CHATML
    if path is not None:
        tok.save_pretrained(path)
    return tok


def save_tiny_with_tokenizer(path, arch="llama", **kw):
    tok = tiny_tokenizer()
    model = save_tiny(path, arch, vocab_size=len(tok), **kw)
    tok.save_pretrained(path)
    return model, tok


def random_ids(n=2, t=12):
    """A fixed batch of token ids for a 256-entry vocabulary."""
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))


def randomize_lora(m, seed=3):
    """Give every LoRA B a small random value, so the adapters change the model's output."""
    from lowbit.nn.lora import LoRALinear

    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, LoRALinear):
            with torch.no_grad():
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)


def tiny_with_random_lora(path, r=4, alpha=8, seed=0):
    """(tokenizer, a tiny float32 lowbit model saved at ``path`` with LoRA r on every linear layer whose factors,
    A and B, are all random — B ≠ 0, so the adapter changes the output): what oracle tests compare against TRL."""
    from lowbit.io.loader import load
    from lowbit.nn.lora import add_lora

    save_tiny(path)
    tok = tiny_tokenizer(path)
    model = load(path, None, compute_dtype=torch.float32)
    add_lora(model, r=r, alpha=alpha, verbose=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return tok, model


@contextlib.contextmanager
def ctrl_c_in_loss(monkeypatch, call: int):
    """Ctrl-C inside the ``call``-th training forward (``training.loss.lm_loss`` with gradients on)."""
    from lowbit.training import loss as loss_mod

    real, calls = loss_mod.lm_loss, [0]

    def flaky(model, batch, *a, **k):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == call:
                raise KeyboardInterrupt
        return real(model, batch, *a, **k)

    monkeypatch.setattr(loss_mod, "lm_loss", flaky)
    try:
        yield
    finally:
        monkeypatch.setattr(loss_mod, "lm_loss", real)


class InterruptAt:
    """A training callback that presses Ctrl-C right after step ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_begin(self, state):
        pass

    def on_step_end(self, state, record):
        if state.step == self.step:
            raise KeyboardInterrupt

    def on_train_end(self, state):
        pass


def runs_compiled_layers(fn):
    """(fn's result, whether it ran a compiled decoder layer): only compiled code calls lowbit's 4-bit matmul
    operator, so a compile that fell back to eager layers (a recompile limit, a graph break) reads False."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, any(e.name == "lowbit::matmul_4bit" for e in prof.events())
