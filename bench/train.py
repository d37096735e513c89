"""QLoRA training throughput and memory: lowbit vs transformers + bitsandbytes + peft vs LoRA on the unquantized
base — same batch of real dialogue tokens, r=16, alpha=32, all linear layers, same compute dtype, in one run.
Each method runs in its own process (peak RSS is per process), 2 warm-up steps then the median of ``--steps``
steps; methods alternate over ``--rounds``.

Models: SmolLM2-135M-Instruct (batch 4 × 256), and LLaMA-shaped models with random weights and SmolLM2's
tokenizer at ~0.6B and ~1.2B parameters (batch 2 × 256), built once into ``$LOWBIT_CACHE/bench/``.

    python bench/train.py [--steps 5] [--rounds 1] [--models smollm2-135m,llama-0.6b,llama-1.2b]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_bytes, run_worker, table, update_readme, write_json

METHODS = ["lowbit-qlora", "peer-bnb-peft-qlora", "lowbit-lora-16bit"]
SEQ, R = 256, 16
# name → (batch, LLaMA shape of a random model: hidden, intermediate, layers, heads, kv heads; None: the real model)
MODELS = {"smollm2-135m": (4, None), "llama-0.6b": (2, (1536, 4096, 20, 12, 4)),
          "llama-1.2b": (2, (2048, 5632, 24, 16, 4))}


def _model_path(name: str):
    """The checkpoint folder of a bench model (random LLaMA-shaped ones are written once, bf16, tied embeddings)."""
    import torch

    from lowbit.cache import cache_root
    from lowbit.io.resolve import resolve_model
    from lowbit.io.tokenizer import load_tokenizer

    shape = MODELS[name][1]
    if shape is None:
        return resolve_model(name)
    out = cache_root() / "bench" / name
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, LlamaConfig

    h, i, layers, heads, kv = shape
    tok = load_tokenizer("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = out.with_name(out.name + ".tmp")
    net.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _batch(tok, batch_size: int):
    from lowbit.data import load_splits

    train, _ = load_splits("chitchat", 0)
    text = "\n".join(m["content"] for r in train[:400] for m in r.data["messages"])
    ids = tok(text, add_special_tokens=False)["input_ids"][: batch_size * SEQ]
    import torch

    x = torch.tensor(ids).view(batch_size, SEQ)
    return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def worker(method: str, model: str, steps: int) -> dict:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from lowbit.dtypes import default_compute_dtype
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.nn.lora import add_lora
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.host_memory import release_between_layers
    from lowbit.training.loss import autocast, lm_loss

    dtype = default_compute_dtype()
    torch.manual_seed(0)
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    path = _model_path(model)
    tok = load_tokenizer(path)
    batch = _batch(tok, MODELS[model][0])
    if method.startswith("lowbit"):
        net = load(path, QuantSpec() if method == "lowbit-qlora" else None, compute_dtype=dtype)
        add_lora(net, r=R, alpha=32, target_modules="all-linear", verbose=False)
        release_between_layers(net)  # as `lowbit train` does: the heap trimmed between layers (host_memory.py)

        def step():
            with autocast(dtype):
                s, n = lm_loss(net, batch)
            (s / n).backward()
            return float(s) / n
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
        net = get_peft_model(net, LoraConfig(r=R, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))

        def step():
            with autocast(dtype):
                loss = net(**batch).loss
            loss.backward()
            return float(loss)
    load_s = time.perf_counter() - t0
    net.train()  # never an eval-mode forward on the peer: bnb's CPU repack trap (DESIGN.md §5)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    times, losses = [], []
    for i in range(steps + 2):
        t = time.perf_counter()
        losses.append(step())
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t)
    st = statistics.median(times)
    return {"method": method, "model": model, "batch": MODELS[model][0], "step_s": st,
            "tokens_per_s": MODELS[model][0] * SEQ / st, "peak_rss_bytes": peak_rss_bytes(),
            "process_baseline_rss_bytes": base_rss, "load_s": load_s, "first_loss": losses[0], "last_loss": losses[-1],
            "step_times": times, "trainable_params": sum(p.numel() for p in params), "compute_dtype": str(dtype)}


def gemm_ceiling() -> float:
    import torch

    from lowbit.dtypes import default_compute_dtype

    from common import timeit

    dtype = default_compute_dtype()
    a, b = torch.randn(1024, 576, dtype=dtype), torch.randn(576, 1536, dtype=dtype)
    t = timeit(lambda: a @ b, 20)
    return 2 * 1024 * 576 * 1536 / t / 1e9


def _run(method: str, model: str, steps: int) -> dict | None:
    return run_worker(__file__, ["--worker", method, model, "--steps", str(steps)], f"{model} {method}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--worker", nargs=2)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.steps)))
        return
    models = args.models.split(",")
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.rounds):
        for model in models:
            for m in METHODS if model == "smollm2-135m" else METHODS[:2]:  # 16-bit LoRA: the small model only
                r = _run(m, model, args.steps)
                if r:
                    runs.setdefault((model, m), []).append(r)
    res = {k: {**r[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
               "step_s": statistics.median(x["step_s"] for x in r),
               "peak_rss_bytes": max(x["peak_rss_bytes"] for x in r)} for k, r in runs.items()}
    rows = [{"model": k[0], "batch": f"{r['batch']}x{SEQ}", "method": k[1], "tokens/s": round(r["tokens_per_s"], 1),
             "step_s": round(r["step_s"], 3), "peak_RSS_MB": round(r["peak_rss_bytes"] / 2**20),
             "load_s": round(r["load_s"], 1), "loss first→last": f"{r['first_loss']:.3f}→{r['last_loss']:.3f}"}
            for k, r in res.items()]
    md = table(rows, list(rows[0]))
    dtype = next(iter(res.values()))["compute_dtype"]
    print(f"LoRA r={R} all-linear, compute {dtype}; {machine()}\n\n{md}")
    summary = {}
    for model in models:
        q, peer, lora = (res.get((model, m)) for m in METHODS)
        s = {}
        if q and peer:
            s["speed_vs_peer"] = q["tokens_per_s"] / peer["tokens_per_s"]
            s["rss_vs_peer"] = q["peak_rss_bytes"] / peer["peak_rss_bytes"]
        if q and lora:
            s["speed_vs_lora16"] = q["tokens_per_s"] / lora["tokens_per_s"]
        summary[model] = s
    if models[0] == "smollm2-135m" and res.get(("smollm2-135m", METHODS[0])):
        flops_per_token = 4 * 134.5e6  # forward 2N + input-gradient 2N (frozen base: no weight gradient)
        summary["smollm2-135m"]["achieved_gflops"] = res[("smollm2-135m", METHODS[0])]["tokens_per_s"] * \
            flops_per_token / 1e9
        summary["gemm_ceiling_gflops"] = gemm_ceiling()
    lines = "; ".join(f"{m}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()) for m, s in summary.items()
                      if isinstance(s, dict) and s)
    lines += f"; gemm ceiling {summary['gemm_ceiling_gflops']:.0f} GFLOP/s" if "gemm_ceiling_gflops" in summary else ""
    print("\n" + lines)
    update_readme("train", f"{md}\n\n{lines}. Compute dtype {dtype}; the peer is never run in eval mode "
                  "(DESIGN.md §5).")
    data = {"machine": machine(), "seq": SEQ, "r": R, "results": [{"model": k[0], **v} for k, v in res.items()],
            "summary": summary}
    print(f"wrote {write_json('train', data)}")


if __name__ == "__main__":
    main()
