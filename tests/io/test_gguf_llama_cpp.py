"""The GGUF export checked by llama.cpp itself (``make test-runtime``; needs llama-cpp-python): the built-in
SmolLM2 after a short fine-tune, exported by ``lowbit export`` (f16, with an Ollama Modelfile), loads in
llama.cpp; its greedy continuations of three prompts equal transformers' on the merged model (up to a near-tie, where
transformers' own two best tokens are within 0.02 logits; every position is also compared teacher-forced), its held-out
perplexity is within 1 % of transformers'; and lowbit's quantized files are byte for byte what llama.cpp's own
quantizer makes of lowbit's f32 file. A LLaMA-2 / Mistral-style (SentencePiece) vocabulary tokenizes in
llama.cpp exactly as in transformers."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.runtime
# f16 weights (and llama.cpp's f16 activations in its matmuls) may flip a choice transformers itself makes by less
# than this many logits (measured: 0.006 at one step of one prompt); a wrong export misses by whole logits
NEAR_TIE = 0.02
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import export as bench  # noqa: E402  (bench/export.py: perplexity, greedy decoding on both sides)


def test_llama_cpp_runs_the_export_like_transformers(tmp_path):
    from lowbit.io.adapters import load_adapter
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.loader import load
    from lowbit.io.merging import dequantize_model
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", lora_r=8, lora_alpha=16, micro_batch_size=4,
                      sequence_len=128, max_steps=12, learning_rate=5e-4, warmup_steps=2, eval_steps=12,
                      save_steps=100, val_set_size=0.05, output_dir=str(tmp_path / "run"), seed=0)
    res = train(cfg, progress=False, log=lambda *a: None)
    assert res["eval_loss"] < res["base_eval_loss"]
    out = tmp_path / "demo.gguf"
    p = subprocess.run([sys.executable, "-m", "lowbit", "export", "--model", "smollm2-135m", "--adapter",
                        str(tmp_path / "run"), "--out", str(out), "--type", "f16", "--ollama"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./demo.gguf\nTEMPLATE")

    tok = load_tokenizer("smollm2-135m")
    net = load_adapter(load("smollm2-135m", compute_dtype=torch.float32), tmp_path / "run")
    f32 = Path(export_gguf(net, tmp_path / "f32.gguf", tok, "f32", progress=False)["path"])
    for t in ("q8_0", "q4_0"):
        mine = Path(export_gguf(net, tmp_path / f"{t}.gguf", tok, t, progress=False)["path"])
        assert bench.same_tensors(mine, bench.llama_quantize(f32, tmp_path / f"llama.cpp-{t}.gguf", t)), t
    merged = dequantize_model(net, torch.float32, merge_adapters=True).eval()
    run, greedy = bench.llama_cpp(out)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True,
                                       return_dict=False) for q in bench.PROMPTS]
    hf = bench.torch_logits(merged)
    for ids in prompts:
        want, got = bench.hf_greedy(merged, ids, tok.eos_token_id), greedy(ids, tok.eos_token_id)
        k = bench.same_prefix(got, want)
        if got != want:  # only where transformers itself is torn: its two candidates within NEAR_TIE logits
            step = hf(ids + want[:k])[-1]
            assert k < min(len(got), len(want)) and step[want[k]] - step[got[k]] < NEAR_TIE, (k, got, want)
        # teacher-forced over transformers' whole continuation: llama.cpp's next-token choice at every position
        # is transformers', or transformers' own top two are within NEAR_TIE
        mine, theirs = hf(ids + want), run(ids + want)
        for t in range(len(ids) - 1, len(ids) + len(want) - 1):
            a, b = int(mine[t].argmax()), int(theirs[t].argmax())
            assert a == b or mine[t][a] - mine[t][b] < NEAR_TIE, (t, a, b)
    texts = bench.held_out(tok, n=20)
    mine, theirs = bench.perplexity(bench.torch_logits(merged), texts), bench.perplexity(run, texts)
    assert abs(theirs / mine - 1) < 0.01, (mine, theirs)


def test_llama_cpp_tokenizes_a_sentencepiece_style_export_like_transformers(tmp_path):
    """A LLaMA-2 / Mistral-style tokenizer (byte-fallback BPE), exported as llama.cpp's "llama" vocabulary: llama.cpp
    splits text into the same ids as transformers, runs of spaces, digits, accents and bytes included."""
    from llama_cpp import Llama
    from test_gguf_export import TEXTS, spm_export

    path, tok = spm_export(tmp_path)
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in [*TEXTS, "  two  spaces", "tab\there", " leading space", "ünïcödé ✓ 🙂"]:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok(text)["input_ids"], text


@pytest.mark.parametrize("scaling", [{"rope_type": "linear", "factor": 4.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_llama_cpp_runs_a_rope_scaled_export_like_transformers(tmp_path, scaling):
    """A tiny LLaMA of native length 64 loaded with ``model_config: {rope_scaling: …}`` and run over 200 positions:
    llama.cpp's logits of the f32 export are transformers' (the unscaled model's are not: the scaling is read)."""
    import numpy as np
    from llama_cpp import Llama

    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import load_tokenizer

    from tiny import save_tiny, tiny_spm_tokenizer

    tok = tiny_spm_tokenizer(tmp_path / "m")
    save_tiny(tmp_path / "m", "llama", vocab_size=len(tok), max_position_embeddings=64)
    net = load(tmp_path / "m", None, compute_dtype=torch.float32,
               config_overrides={"rope_scaling": scaling, "max_position_embeddings": 256}).eval()
    export_gguf(net, tmp_path / "r.gguf", load_tokenizer(tmp_path / "m"), "f32", progress=False)
    ids = torch.randint(3, len(tok), (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        want = net(torch.tensor([ids])).logits[0].numpy()
        plain = load(tmp_path / "m", None, compute_dtype=torch.float32).eval()(torch.tensor([ids])).logits[0].numpy()
    llm = Llama(model_path=str(tmp_path / "r.gguf"), n_ctx=256, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)], dtype=np.float32)
    scale = float(np.abs(want).max())
    assert np.abs(got - want).max() < 2e-3 * scale, (np.abs(got - want).max(), scale)
    assert np.abs(plain - want).max() > 0.05 * scale
