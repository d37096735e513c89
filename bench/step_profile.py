"""Where a QLoRA training step's time goes: lowbit's step (forward, backward, AdamW) under PyTorch's profiler, the
self time of every operator put in one family by what it is and where it runs:

    dequantize        inside ``lowbit::dequantize`` (the 4-bit weights unpacked for a matmul, forward and backward)
    base matmuls      matrix products of the base layers (neither side of rank r, not the vocabulary head)
    LoRA matmuls      matrix products with one side of rank r
    head and loss     the vocabulary head's products and the cross-entropy (log-softmax, gather, their backward)
    attention         scaled-dot-product attention, forward and backward (with compiled layers: the backward's
                      batched products too)
    elementwise       norms, activations, RoPE, residual adds, casts and copies (in compiled layers: the fused
                      kernels of their graphs)
    optimizer         inside the optimizer step
    Python and other  the step's wall time not spent in an operator (interpreter, autograd bookkeeping)

Same model, batch and settings as bench/train.py's lowbit-qlora row (SmolLM2-135M-Instruct 4×256; the random
~1.2B LLaMA 2×256 with ``--models llama-1.2b``), r=16 on all linear layers, this machine's compute dtype, the model
prepared as ``lowbit train`` prepares it (``--compile false``: eager layers). The profiler's own cost makes the
profiled step slower than an unprofiled one; both are printed.

    python bench/step_profile.py [--models smollm2-135m,llama-1.2b] [--steps 2] [--compile false] [--readme]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, run_worker, table

FAMILIES = ["dequantize", "base matmuls", "LoRA matmuls", "head and loss", "attention", "elementwise", "optimizer",
            "Python and other"]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
LOSS = ("log_softmax", "nll_loss", "cross_entropy", "logsumexp", "aten::gather", "aten::scatter")


def _family(event, scopes: list[str], r: int, vocab: int) -> str:
    if "lowbit::dequantize" in scopes:
        return "dequantize"
    if "lowbit::optimizer" in scopes:
        return "optimizer"
    name = event.name
    if "attention" in name or "scaled_dot_product" in name or name == "aten::bmm":
        return "attention"
    if any(k in name for k in LOSS):
        return "head and loss"
    if name in MATMULS:
        dims = {d for shape in (event.input_shapes or []) for d in (shape or [])}
        if vocab in dims:
            return "head and loss"
        return "LoRA matmuls" if r in dims else "base matmuls"
    return "elementwise"


def _scopes(event) -> list[str]:
    out, e = [], event.cpu_parent
    while e is not None:
        out.append(e.name)
        e = e.cpu_parent
    return out


def worker(model: str, steps: int, compiled: bool) -> dict:
    import logging
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from train import MODELS, SEQ, R, _batch, _model_path

    from lowbit.dtypes import default_compute_dtype
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.nn.compiled_layers import is_compiled
    from lowbit.nn.linear import parameter_counts
    from lowbit.nn.lora import add_lora
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.config import TrainConfig
    from lowbit.training.loss import autocast, lm_loss
    from lowbit.training.model import prepare_model

    dtype = default_compute_dtype()
    torch.manual_seed(0)
    path = _model_path(model)
    tok = load_tokenizer(path)
    batch = _batch(tok, MODELS[model][0])
    net = load(path, QuantSpec(), compute_dtype=dtype)
    add_lora(net, r=R, alpha=32, target_modules="all-linear", verbose=False)
    # as `lowbit train` prepares the model (training/model.py: document attention, heap trims, compile)
    prepare_model(TrainConfig(compile="auto" if compiled else False), net, parameter_counts(net)[1], print)
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    vocab = net.get_output_embeddings().weight.shape[0]

    def step():
        with autocast(dtype):
            s, n = lm_loss(net, batch)
        (s / n).backward()
        with record_function("lowbit::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    plain = []
    for i in range(steps + 2):
        t = time.perf_counter()
        step()
        if i >= 2:
            plain.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - t) / steps
    by = dict.fromkeys(FAMILIES, 0.0)
    for e in prof.events():
        if e.name == "lowbit::dequantize":
            fam = "dequantize"
        elif e.name.startswith(("lowbit::", "autograd::", "_")) or "Backward" in e.name:
            continue  # ranges and autograd nodes (their Python: "other"); their operators are counted themselves
        else:
            fam = _family(e, _scopes(e), R, vocab)
        by[fam] += e.self_cpu_time_total / 1e6 / steps
    by["Python and other"] = max(0.0, wall - sum(v for k, v in by.items() if k != "Python and other"))
    return {"model": model, "batch": MODELS[model][0], "seq": SEQ, "compute_dtype": str(dtype),
            "compiled": any(is_compiled(m) for m in net.modules()),
            "step_s": statistics.median(plain), "profiled_step_s": wall, "families_s": by}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--compile", default="auto", choices=["auto", "false"])
    ap.add_argument("--worker", nargs=1)
    args = ap.parse_args()
    if args.worker:
        import json

        print("RESULT " + json.dumps(worker(args.worker[0], args.steps, args.compile == "auto")), flush=True)
        return
    results = [r for m in args.models.split(",") if (r := run_worker(
        __file__, ["--worker", m, "--steps", str(args.steps), "--compile", args.compile], m)) is not None]
    rows = []
    for fam in FAMILIES:
        row = {"family": fam}
        for r in results:
            s = r["families_s"][fam]
            row[r["model"]] = f"{s:.3f} s ({100 * s / r['profiled_step_s']:.0f} %)"
        rows.append(row)
    rows.append({"family": "step, profiled", **{r["model"]: f"{r['profiled_step_s']:.3f} s" for r in results}})
    rows.append({"family": "step, not profiled", **{r["model"]: f"{r['step_s']:.3f} s" for r in results}})
    md = table(rows, ["family", *[r["model"] for r in results]])
    md += "\n\n" + ", ".join(f"{r['model']}: batch {r['batch']}×{r['seq']}, {r['compute_dtype']}, "
                             f"{'compiled' if r['compiled'] else 'eager'} layers" for r in results)
    publish("step_profile", md, {"results": results}, args.readme)


if __name__ == "__main__":
    main()
