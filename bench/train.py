"""QLoRA training throughput and memory: lowbit vs transformers + bitsandbytes + peft vs LoRA on the unquantized
base — same batch of real dialogue tokens, r=16, alpha=32, all linear layers, same compute dtype, in one run.
Each method runs in its own process (peak RSS is per process), 2 warm-up steps (lowbit's compile happens there:
its time is reported) then the median of ``--steps`` steps; methods alternate over ``--rounds``. lowbit's model is
prepared as ``lowbit train`` prepares it (document attention, heap trims, ``compile``); ``lowbit-qlora-eager`` is the
same with ``compile: false``.

The floor: the step's matrix products (base layers forward and input-gradient, LoRA's six products per adapted
layer, the chunked head twice, attention's five backward and two forward products at half for causality),
each shape timed alone with ``torch.matmul`` in this run, in the compute dtype — the step if nothing but its GEMMs
ran.

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

METHODS = ["lowbit-qlora", "peer-bnb-peft-qlora", "lowbit-lora-16bit", "lowbit-qlora-eager"]
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
    from lowbit.nn.linear import parameter_counts
    from lowbit.nn.lora import add_lora
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.config import TrainConfig
    from lowbit.training.loss import autocast, lm_loss
    from lowbit.training.model import prepare_model

    dtype = default_compute_dtype()
    torch.manual_seed(0)
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    path = _model_path(model)
    tok = load_tokenizer(path)
    batch = _batch(tok, MODELS[model][0])
    if method.startswith("lowbit"):
        net = load(path, None if method == "lowbit-lora-16bit" else QuantSpec(), compute_dtype=dtype)
        add_lora(net, r=R, alpha=32, target_modules="all-linear", verbose=False)
        # as `lowbit train` prepares the model (training/model.py: document attention, heap trims, compile)
        cfg = TrainConfig(compile=False if method == "lowbit-qlora-eager" else "auto")
        prepare_model(cfg, net, parameter_counts(net)[1], print)

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
    times, losses, warmup = [], [], []
    for i in range(steps + 2):
        t = time.perf_counter()
        losses.append(step())
        opt.step()
        opt.zero_grad(set_to_none=True)
        (times if i >= 2 else warmup).append(time.perf_counter() - t)
    st = statistics.median(times)
    return {"method": method, "model": model, "batch": MODELS[model][0], "step_s": st, "warmup_s": warmup,
            "tokens_per_s": MODELS[model][0] * SEQ / st, "peak_rss_bytes": peak_rss_bytes(),
            "process_baseline_rss_bytes": base_rss, "load_s": load_s, "first_loss": losses[0], "last_loss": losses[-1],
            "step_times": times, "trainable_params": sum(p.numel() for p in params), "compute_dtype": str(dtype)}


def _gemms(model: str) -> list[tuple[int, int, int, int, float]]:
    """(count, m, k, n, weight) of every matrix product of one lowbit step of ``model`` (see the docstring)."""
    from transformers import AutoConfig

    from lowbit.nn.loss_chunk import loss_chunk_tokens

    c = AutoConfig.from_pretrained(_model_path(model))
    b, d, i, v = MODELS[model][0], c.hidden_size, c.intermediate_size, c.vocab_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    t, h, kv = b * SEQ, c.num_attention_heads, c.num_key_value_heads
    out = []
    for fan_in, fan_out in ((d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, i), (d, i), (i, d)):
        out += [(1, t, fan_in, fan_out, 1.0), (1, t, fan_out, fan_in, 1.0),  # base forward, input gradient
                (1, t, fan_in, R, 1.0), (1, t, R, fan_out, 1.0), (1, t, fan_out, R, 1.0), (1, t, R, fan_in, 1.0),
                (1, R, t, fan_in, 1.0), (1, fan_out, t, R, 1.0)]  # LoRA forward, input gradient, weight gradients
    out = [(c.num_hidden_layers * n, *rest) for n, *rest in out]
    rows, chunk = b * (SEQ - 1), loss_chunk_tokens(v)
    for n_rows in [chunk] * (rows // chunk) + ([rows % chunk] if rows % chunk else []):
        out += [(1, n_rows, d, v, 1.0), (1, n_rows, v, d, 1.0)]  # head forward, input gradient (formed in forward)
    attn = b * h * c.num_hidden_layers
    out += [(attn * 4, SEQ, hd, SEQ, 0.5), (attn * 3, SEQ, SEQ, hd, 0.5)]  # causal: half of each product
    return out


def floor_s(model: str) -> tuple[float, float]:
    """(the step's GEMM time, its GEMM FLOPs) for ``model``: each product's shape timed alone in this process."""
    import torch

    from lowbit.dtypes import default_compute_dtype

    from common import timeit

    dtype, total, flops, seen = default_compute_dtype(), 0.0, 0.0, {}
    for count, m, k, n, weight in _gemms(model):
        if (m, k, n) not in seen:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            seen[(m, k, n)] = timeit(lambda: a @ b, 10, 3)
        total += count * weight * seen[(m, k, n)]
        flops += count * weight * 2 * m * k * n
    return total, flops


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
            for m in METHODS if model == "smollm2-135m" else METHODS[:2]:  # 16-bit LoRA, eager: the small model
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
        q, peer, lora = (res.get((model, m)) for m in METHODS[:3])
        s = {}
        if q and peer:
            s["speed_vs_peer"] = q["tokens_per_s"] / peer["tokens_per_s"]
            s["rss_vs_peer"] = q["peak_rss_bytes"] / peer["peak_rss_bytes"]
        if q and lora:
            s["speed_vs_lora16"] = q["tokens_per_s"] / lora["tokens_per_s"]
        summary[model] = s
    for model in models:
        q = res.get((model, METHODS[0]))
        if q:
            floor, flops = floor_s(model)
            eager = res.get((model, "lowbit-qlora-eager"))
            summary[model].update(floor_s=floor, step_vs_floor=q["step_s"] / floor,
                                  step_tflops=flops / q["step_s"] / 1e12, gemm_tflops=flops / floor / 1e12,
                                  compile_warmup_s=sum(q["warmup_s"]) - 2 * q["step_s"],
                                  **({"speed_vs_eager": eager["step_s"] / q["step_s"]} if eager else {}))
    lines = "; ".join(f"{m}: " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()) for m, s in summary.items() if s)
    print("\n" + lines)
    update_readme("train", f"{md}\n\n{lines}. Compute dtype {dtype}; the peer is never run in eval mode "
                  "(DESIGN.md §5); floor_s: the step's GEMMs alone (see bench/train.py); compile_warmup_s: the two "
                  "warm-up steps' time beyond two steps (what compiling cost, with a warm or cold cache).")
    data = {"machine": machine(), "seq": SEQ, "r": R, "results": [{"model": k[0], **v} for k, v in res.items()],
            "summary": summary}
    print(f"wrote {write_json('train', data)}")


if __name__ == "__main__":
    main()
