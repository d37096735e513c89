"""The prepared GPU check: one script, ≤ 8 minutes on one H200, JSON written after every phase (a timeout still
returns the phases that finished), tables printed at the end.

    dequant    dequantize GB/s (bf16 out) at 4096², 11008×4096, 22016×8192: lowbit's Triton kernel (NF4, and the
               3-/2-bit packed NF3, NF2) vs bitsandbytes' CUDA kernel vs lowbit's PyTorch path vs a copy of the
               same bytes; byte equality with bitsandbytes on those and an odd shape (fp32, bf16, fp16)
    step7b     a LLaMA-7B-shaped model with random 4-bit weights (the same bytes for both): one QLoRA step (r=16
               all-linear, checkpointing, 8-bit AdamW, 4 × 1024 tokens): tokens/s and max_memory_allocated,
               lowbit vs transformers + bitsandbytes + peft
    headline   the seed's claim: a LLaMA-65B-shaped model whose NF4 codes and constants are generated on the GPU,
               one QLoRA step at batch 1 × 512 with paged 8-bit AdamW: loss finite, peak memory ≤ 48 GB, and
               the planner's prediction beside it

    python bench/gpu.py [--out DIR] [--phases dequant,step7b,headline]
    python bench/gpu.py --smoke     # the same end to end on CPU, tiny shapes, Triton's interpreter (a test runs it)

What the GPU machine needs: its image has torch, triton, transformers and peft, not bitsandbytes (and no
network). Carry its wheel: here `pip download bitsandbytes==0.50.2 --no-deps -d .whl`, and on the device
`pip install --no-deps .whl/bitsandbytes-*.whl` with `.whl` in `carry`. Without it the bitsandbytes columns
read "not installed" and the peer step is skipped. Run from the repository root with PYTHONPATH=src.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before anything imports Triton: its kernels then run in the interpreter on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402  (after TRITON_INTERPRET)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table  # noqa: E402

PHASES = ("dequant", "step7b", "headline")
FULL = {"dequant": [(4096, 4096), (11008, 4096), (22016, 8192)], "odd": (4099, 77),
        "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000), "7b_batch": (4, 1024),
        "65b": dict(hidden=8192, inter=22016, layers=80, heads=64, kv=64, vocab=32000), "65b_batch": (1, 512)}
# on CPU, bitsandbytes' own dequantize is wrong when a row is not a whole number of blocks (DESIGN.md §2): the
# smoke shapes avoid that (an odd row length takes its correct fallback)
TINY = {"dequant": [(256, 256), (96, 192)], "odd": (33, 77),
        "7b": dict(hidden=64, inter=128, layers=2, heads=4, kv=4, vocab=256), "7b_batch": (2, 16),
        "65b": dict(hidden=128, inter=256, layers=2, heads=4, kv=4, vocab=256), "65b_batch": (1, 32)}


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def _time(fn, device: str, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` after warm-up (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    ts = []
    for _ in range(max(3, repeats // 5)):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _triton(q, dtype, out=None):
    """lowbit's Triton kernel (what the dispatch point runs on CUDA; in the interpreter on CPU tensors)."""
    from lowbit.quant import triton_dequant

    nested = (q.absmax, q.nested_absmax, q.nested_code, q.nested_offset, q.nested_blocksize) if q.double_quant \
        else None
    return triton_dequant.dequantize(q.packed, None if nested else q.absmax, q.code, q.blocksize, q.shape, dtype,
                                     out=out, nested=nested)


def phase_dequant(sizes: dict, device: str) -> dict:
    import lowbit
    from lowbit.quant import nf4

    bnb = _bnb()
    rows, equal = [], {}
    for shape in [*sizes["dequant"], sizes["odd"]]:
        w = torch.randn(shape, device=device)
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            if bnb is None:
                break
            bp, st = bnb.functional.quantize_4bit(w.to(dt), quant_type="nf4", compress_statistics=True)
            sd = {"w": bp, **{f"w.{k}": v for k, v in st.as_dict(packed=True).items()}}
            q = lowbit.QuantizedTensor.from_state_dict(sd, "w")
            same = torch.equal(_triton(q, dt), bnb.functional.dequantize_4bit(bp, st))
            equal[f"{shape[0]}x{shape[1]} {str(dt)[6:]}"] = same
        if shape == sizes["odd"]:
            continue
        q = lowbit.quantize(w.cpu()).to(device)
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        src = torch.empty_like(out)
        am = q.absmax_float()
        t = {"copy": _time(lambda: out.copy_(src), device),
             "lowbit Triton": _time(lambda: _triton(q, torch.bfloat16, out), device),
             "lowbit PyTorch path": _time(lambda: nf4.dequantize_torch(q.packed, am, q.code, 64, q.shape,
                                                                      torch.bfloat16, out), device)}
        for qt in ("nf3", "nf2"):  # 3- and 2-bit packing (the Triton kernel that unpacks them)
            qk = lowbit.quantize(w.cpu(), qt).to(device)
            t[f"lowbit Triton {qt}"] = _time(lambda qk=qk: _triton(qk, torch.bfloat16, out), device)
        if bnb is not None:
            bp, st = bnb.functional.quantize_4bit(w.to(torch.bfloat16), quant_type="nf4", compress_statistics=True)
            t["bitsandbytes"] = _time(lambda: bnb.functional.dequantize_4bit(bp, st), device)
        nbytes = out.numel() * 2
        rows += [{"shape": f"{shape[0]}x{shape[1]}", "impl": k, "ms": round(v * 1e3, 4),
                  "GB/s": round(nbytes / v / 1e9, 1)} for k, v in t.items()]
    return {"rows": rows, "byte_equal_with_bitsandbytes": equal if bnb else "bitsandbytes not installed"}


def random_qlora_model(shape: dict, device: str, dtype=torch.bfloat16):
    """A LLaMA-shaped causal LM whose linear layers hold random NF4+DQ bytes generated on ``device`` (no float
    weights ever exist), embeddings and norms random/ones in ``dtype``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.io.loader import params_on_meta
    from lowbit.nn.fused import fuse_modules
    from lowbit.nn.linear import Linear4bit
    from lowbit.quant.codebooks import codebook, dynamic_map
    from lowbit.quant.tensor import QuantizedTensor

    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv"], max_position_embeddings=4096, tie_word_embeddings=False)
    with params_on_meta():
        net = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    code, ncode = codebook("nf4").to(device), dynamic_map(True).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    for name, mod in list(net.named_modules()):
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            n = mod.in_features * mod.out_features
            blocks = -(-n // 64)
            u8 = lambda k: torch.randint(0, 256, (k,), dtype=torch.uint8, device=device, generator=g)
            nested = torch.rand(-(-blocks // 256), device=device, generator=g) * 0.02 + 0.01
            q = QuantizedTensor(u8((n + 1) // 2).view(-1, 1), u8(blocks), torch.Size((mod.out_features,
                                mod.in_features)), dtype, 64, "nf4", code, nested, ncode, 0.02)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, Linear4bit(q, compute_dtype=dtype))
    for mod in net.modules():  # what is left on meta: embeddings, head, norms
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.device.type == "meta":
                t = torch.ones(p.shape, dtype=dtype, device=device) if p.dim() == 1 else \
                    torch.randn(p.shape, dtype=dtype, device=device, generator=g) * 0.02
                mod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)
    fuse_modules(net)
    return net.to(device)


def _qlora_step(net, batch, optimizer: str, device: str, dtype, steps: int) -> dict:
    from lowbit.nn.lora import add_lora
    from lowbit.optim.paged import make
    from lowbit.training.loss import autocast, lm_loss

    add_lora(net, r=16, alpha=16, target_modules="all-linear", verbose=False)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    net.train()
    opt = make(optimizer, [p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return _timed_steps(lambda: lm_loss(net, batch), opt, device, dtype, steps, autocast)


def _timed_steps(loss_fn, opt, device: str, dtype, steps: int, autocast) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(dtype, device):
            s, n = loss_fn()
        loss = s / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    tokens = int(n)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"step_s": statistics.median(times[1:] or times), "loss": losses[-1], "finite": all(map(math.isfinite,
            losses)), "tokens_per_s": tokens / statistics.median(times[1:] or times), "peak_bytes": peak}


def _peer_from(net, device: str, dtype):
    """transformers + bitsandbytes + peft on the same bytes: every Linear4bit becomes bnb's Linear4bit."""
    from peft import LoraConfig, get_peft_model

    from lowbit.nn.linear import Linear4bit

    bnb = _bnb()
    for name, mod in list(net.named_modules()):
        if isinstance(mod, Linear4bit):
            sd = {k[len("weight."):]: v for k, v in mod.weight.state_dict("weight").items() if k != "weight"}
            w = bnb.nn.Params4bit.from_prequantized(mod.codes.data, sd, requires_grad=False, device=device)
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=dtype,
                                    quant_type="nf4", device=device)
            new.weight = w
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, new)
    return get_peft_model(net, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))


def phase_step7b(sizes: dict, device: str) -> dict:
    from lowbit.training.loss import autocast

    dtype = torch.bfloat16
    b, t = sizes["7b_batch"]
    ids = torch.randint(0, sizes["7b"]["vocab"], (b, t), device=device)
    batch = {"input_ids": ids, "labels": ids}
    out = {"lowbit": _qlora_step(random_qlora_model(sizes["7b"], device), batch, "adamw_8bit", device, dtype, 4)}
    if device == "cuda":
        torch.cuda.empty_cache()
    if _bnb() is None:
        out["peer"] = "bitsandbytes not installed"
        return out
    peer = _peer_from(random_qlora_model(sizes["7b"], device), device, dtype)
    peer.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peer.train()  # never an eval-mode forward on the peer (bitsandbytes' CPU repack trap, DESIGN.md §5)
    opt = _bnb().optim.AdamW8bit([p for p in peer.parameters() if p.requires_grad], lr=1e-4)

    def peer_loss():
        return peer(**batch).loss * int((ids[:, 1:] >= 0).sum()), int((ids[:, 1:] >= 0).sum())

    out["peer"] = _timed_steps(peer_loss, opt, device, dtype, 4, autocast)
    return out


def phase_headline(sizes: dict, device: str) -> dict:
    from lowbit.planner.memory import plan

    b, t = sizes["65b_batch"]
    t0 = time.perf_counter()
    net = random_qlora_model(sizes["65b"], device)
    built_s = time.perf_counter() - t0
    ids = torch.randint(0, sizes["65b"]["vocab"], (b, t), device=device)
    res = _qlora_step(net, {"input_ids": ids, "labels": ids}, "paged_adamw_8bit", device, torch.bfloat16, 2)
    s = sizes["65b"]
    predicted = plan({"hidden_size": s["hidden"], "intermediate_size": s["inter"], "num_hidden_layers": s["layers"],
                      "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"], "vocab_size": s["vocab"]},
                     sequence_len=t, micro_batch_size=b, gradient_checkpointing=True, optimizer="paged_adamw_8bit",
                     device="cuda").total_bytes
    return {**res, "model_built_s": built_s, "planner_predicted_bytes": predicted,
            "fits_48GB": res["peak_bytes"] is not None and res["peak_bytes"] <= 48 * 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, Triton's interpreter")
    ap.add_argument("--out", default=str(Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "gpu.json"))
    ap.add_argument("--phases", default=",".join(PHASES))
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU, or --smoke here")
    sizes = TINY if a.smoke else FULL
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    for phase in a.phases.split(","):
        t = time.perf_counter()
        try:
            res[phase] = globals()[f"phase_{phase}"](sizes, device)
        except Exception as e:  # keep the phases that finished, say what broke
            res[phase] = {"error": f"{type(e).__name__}: {e}"}
        res[phase]["wall_s"] = round(time.perf_counter() - t, 1)
        out.write_text(json.dumps(res, indent=1, default=str))  # after every phase
        print(f"{phase}: {json.dumps(res[phase], default=str)[:2000]}", flush=True)
    if isinstance(res.get("dequant"), dict) and res["dequant"].get("rows"):
        print("\n" + table(res["dequant"]["rows"], ["shape", "impl", "ms", "GB/s"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
