"""GGUF export of the demo's fine-tune, judged by llama.cpp itself: per type, the file size, the held-out
perplexity as transformers computes it on the merged model (the reference), as lowbit computes it reading the
GGUF back, and as llama.cpp (llama-cpp-python) computes it, and how many greedy tokens llama.cpp generates equal to
transformers' on the merged model; and whether each quantized file is byte for byte what llama.cpp's own
quantizer makes of lowbit's f32 file (plus llama.cpp's Q4_K_M, which the ``gguf`` package cannot make, as a row).
Prints the table, writes bench/results/export.json and (``--readme``) the README table.

    python bench/export.py [--adapter runs/demo] [--types f16 q8_0 q4_0] [--readme]

Without ``--adapter`` the demo's fine-tune is made first (``lowbit demo``'s settings; a few minutes). Needs
llama-cpp-python (``make test-runtime`` installs it).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, table

PROMPTS = ("what is a wavelength", "who are you", "The capital of France is")
NEW_TOKENS = 32


def demo_adapter(out: Path) -> Path:
    """The demo's fine-tune (lowbit demo's settings), trained into ``out``."""
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    cfg = TrainConfig(base_model="smollm2-135m", datasets="chatterbot", lora_target_modules="all-linear", lora_r=16,
                      lora_alpha=32, micro_batch_size=8, sequence_len=256, max_steps=150, learning_rate=3e-4,
                      warmup_steps=10, eval_steps=50, save_steps=50, val_set_size=0.05, output_dir=str(out), seed=0)
    train(cfg, overwrite=True, progress=False)
    return out


def held_out(tok, n: int = 40) -> list[list[int]]:
    """Token ids of the demo's held-out dialogues (chat template applied)."""
    from lowbit.data.records import load_splits

    _, valid = load_splits("chatterbot", 0.05, 0)
    return [tok.apply_chat_template(r.data["messages"], tokenize=True, return_dict=False) for r in valid[:n]]


def _nll(logits: np.ndarray, ids: list[int]) -> tuple[float, int]:
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -float(logp[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def perplexity(logits_of, texts) -> float:
    total, count = 0.0, 0
    for ids in texts:
        nll, n = _nll(logits_of(ids), ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def torch_logits(model):
    def run(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()
    return run


def llama_cpp(path: Path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)

    def run(ids):
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    def greedy(ids, eos):
        llm.reset()
        out = []
        for t in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            out.append(t)
            if t == eos or len(out) == NEW_TOKENS:
                break
        return out

    return run, greedy


def read_back(path: Path, cache: Path):
    """lowbit reading the GGUF (its converted copy goes to ``cache``, removed again: the user's cache stays clean)."""
    from lowbit.io.loader import load

    old = os.environ.get("LOWBIT_CACHE")
    os.environ["LOWBIT_CACHE"] = str(cache)
    try:
        return load(path, quant=None, compute_dtype=torch.float32).eval()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        if old is None:
            del os.environ["LOWBIT_CACHE"]
        else:
            os.environ["LOWBIT_CACHE"] = old


def hf_greedy(model, ids, eos) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)[0, len(ids):].tolist()
    return out


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def llama_quantize(src: Path, dst: Path, gguf_type: str) -> Path:
    """llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) applied to ``src``."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if gguf_type == "f32" else
                           f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {gguf_type}")
    return dst


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of ``a`` and ``b``: same name, type and bytes."""
    import gguf

    ta, tb = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (a, b))
    return ta.keys() == tb.keys() and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(ta[n].data).view(np.uint8),
                                                                  np.asarray(tb[n].data).view(np.uint8))
        for n in ta)


def render(rows: list[dict], n_texts: int) -> str:
    """The README table (perplexities to 3 decimals: f16's and bf16's differences are in the second)."""
    shown = [{k: f"{v:.3f}" if k.startswith("ppl") else v for k, v in r.items()} for r in rows]
    return table(shown, list(rows[0])) + (
        f"\n\nSmolLM2-135M-Instruct + the demo's LoRA (r=16, 150 steps), {n_texts} held-out chatterbot dialogues "
        "(perplexity over every token of each dialogue, prompts included); "
        f"greedy: {len(PROMPTS)} prompts × up to {NEW_TOKENS} tokens, identical prefix length; "
        "llama.cpp via llama-cpp-python, 2 threads. \"bytes = llama.cpp's quantizer\": every "
        "tensor identical to llama.cpp's `llama_model_quantize` applied to lowbit's f32 file.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", help="the fine-tune to export (default: train the demo's)")
    ap.add_argument("--types", nargs="*", default=["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    from lowbit.io.adapters import load_adapter
    from lowbit.io.gguf_export import export_gguf
    from lowbit.io.loader import load
    from lowbit.io.merging import dequantize_model
    from lowbit.io.tokenizer import load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="lowbit-export-"))
    adapter = Path(args.adapter) if args.adapter else demo_adapter(work / "demo")
    tok = load_tokenizer("smollm2-135m")
    net = load_adapter(load("smollm2-135m", compute_dtype=torch.float32), adapter).eval()
    texts = held_out(tok)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True,
                                       return_dict=False) for p in PROMPTS]
    files = {t: Path(export_gguf(net, work / f"demo-{t}.gguf", tok, t, progress=False)["path"])
             for t in dict.fromkeys(["f32", *args.types])}
    # llama.cpp's own quantizer on lowbit's f32 file: the same bytes? and its Q4_K_M (no quantizer in gguf) as a row
    theirs = {t: llama_quantize(files["f32"], work / f"llama.cpp-{t}.gguf", t) for t in [*args.types, "q4_k_m"]}
    merged = dequantize_model(net, torch.float32, merge_adapters=True).eval()  # transformers' own layers now
    ref_ppl = perplexity(torch_logits(merged), texts)
    ref_greedy = [hf_greedy(merged, p, tok.eos_token_id) for p in prompts]
    rows = []
    for t, path in [*((t, files[t]) for t in args.types), ("q4_k_m (llama.cpp's quantizer)", theirs["q4_k_m"])]:
        back = read_back(path, work / "cache")
        run, greedy = llama_cpp(path)
        outs = [greedy(p, tok.eos_token_id) for p in prompts]
        rows.append({"type": t, "MiB": round(path.stat().st_size / 2**20, 1),
                     "bytes = llama.cpp's quantizer": ("✓" if same_tensors(path, theirs[t]) else "✗")
                     if t in theirs else "(is llama.cpp's)",
                     "ppl transformers (merged)": round(ref_ppl, 3),
                     "ppl lowbit reading the GGUF": round(perplexity(torch_logits(back), texts), 3),
                     "ppl llama.cpp": round(perplexity(run, texts), 3),
                     "greedy tokens = transformers'": f"{sum(same_prefix(a, b) for a, b in zip(ref_greedy, outs))}/"
                                                      f"{sum(len(a) for a in ref_greedy)}"})
        print(rows[-1], flush=True)
    md = render(rows, len(texts))
    publish("export", md, {"adapter": str(adapter), "rows": rows}, args.readme)
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
