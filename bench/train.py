"""QLoRA training throughput and memory on SmolLM2-135M-Instruct: lowbit vs transformers + bitsandbytes + peft
vs LoRA on the unquantized base — same batch (4 × 256 tokens of real dialogue), r=16, alpha=32, all linear
layers, same compute dtype, in one run. Each method runs in its own process (peak RSS is per process),
2 warm-up steps then the median of ``--steps`` steps; methods alternate over ``--rounds``.

    python bench/train.py [--steps 5] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, peak_rss_bytes, table, update_readme, write_json

METHODS = ["lowbit-qlora", "peer-bnb-peft-qlora", "lowbit-lora-16bit"]
BATCH, SEQ, R = 4, 256, 16


def _batch(tok):
    from lowbit.data import load_splits

    train, _ = load_splits("chitchat", 0)
    text = "\n".join(m["content"] for r in train[:400] for m in r.data["messages"])
    ids = tok(text, add_special_tokens=False)["input_ids"][: BATCH * SEQ]
    import torch

    x = torch.tensor(ids).view(BATCH, SEQ)
    return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def worker(method: str, steps: int) -> dict:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from lowbit.dtypes import default_compute_dtype
    from lowbit.io.loader import load
    from lowbit.io.resolve import resolve_model
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.nn.lora import add_lora
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.loss import autocast, lm_loss

    dtype = default_compute_dtype()
    torch.manual_seed(0)
    base_rss = peak_rss_bytes()
    t0 = time.perf_counter()
    tok = load_tokenizer("smollm2-135m")
    batch = _batch(tok)
    if method.startswith("lowbit"):
        net = load("smollm2-135m", QuantSpec() if method == "lowbit-qlora" else None, compute_dtype=dtype)
        add_lora(net, r=R, alpha=32, target_modules="all-linear", verbose=False)

        def step():
            with autocast(dtype):
                s, n = lm_loss(net, batch)
            (s / n).backward()
            return float(s) / n
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        path = resolve_model("smollm2-135m")
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
    return {"method": method, "step_s": st, "tokens_per_s": BATCH * SEQ / st, "peak_rss_bytes": peak_rss_bytes(),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for m in METHODS:
            p = subprocess.run([sys.executable, __file__, "--worker", m, "--steps", str(args.steps)],
                               capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            line = [row for row in p.stdout.splitlines() if row.startswith("RESULT ")]
            if p.returncode or not line:
                print(f"{m} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                continue
            runs[m].append(json.loads(line[0][7:]))
    res = {m: {**r[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
               "step_s": statistics.median(x["step_s"] for x in r),
               "peak_rss_bytes": max(x["peak_rss_bytes"] for x in r)} for m, r in runs.items() if r}
    ceiling = gemm_ceiling()
    rows = [{"method": m, "tokens/s": round(r["tokens_per_s"], 1), "step_s": round(r["step_s"], 3),
             "peak_RSS_MB": round(r["peak_rss_bytes"] / 2**20), "load_s": round(r["load_s"], 1),
             "loss first→last": f"{r['first_loss']:.3f}→{r['last_loss']:.3f}"} for m, r in res.items()]
    md = table(rows, ["method", "tokens/s", "step_s", "peak_RSS_MB", "load_s", "loss first→last"])
    dtype = next(iter(res.values()))["compute_dtype"]
    print(f"SmolLM2-135M, batch {BATCH}x{SEQ}, LoRA r={R} all-linear, compute {dtype}; "
          f"{machine()}\n")
    print(md)
    q, peer, lora = (res.get(k) for k in METHODS)
    summary = {}
    if q and peer:
        summary["speed_vs_peer"] = q["tokens_per_s"] / peer["tokens_per_s"]
        summary["rss_vs_peer"] = q["peak_rss_bytes"] / peer["peak_rss_bytes"]
    if q and lora:
        summary["speed_vs_lora16"] = q["tokens_per_s"] / lora["tokens_per_s"]
    flops_per_token = 4 * 134.5e6  # forward 2N + input-gradient 2N (frozen base: no weight gradient)
    if q:
        summary["achieved_gflops"] = q["tokens_per_s"] * flops_per_token / 1e9
    summary["gemm_ceiling_gflops"] = ceiling
    line = ", ".join(f"{k} {v:.2f}" for k, v in summary.items())
    print("\n" + line)
    update_readme("train", f"{md}\n\n{line}. Compute dtype {next(iter(res.values()))['compute_dtype']}; the peer is "
                  "never run in eval mode (DESIGN.md §5).")
    data = {"machine": machine(), "batch": BATCH, "seq": SEQ, "r": R, "results": res, "summary": summary}
    print(f"wrote {write_json('train', data)}")


if __name__ == "__main__":
    main()
