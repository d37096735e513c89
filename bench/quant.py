"""Quantize / dequantize speed, lowbit vs bitsandbytes vs torchao, the 4-bit layer's forward + backward, and the
error of each data type. All peers are measured in the same run; medians of ≥ 5 repeats after warm-up.

    python bench/quant.py [--repeats 7] [--size 4096]

Like with like: the dequantize rows that are compared all allocate their output, as a caller of
bitsandbytes' ``dequantize_4bit`` gets it; "into a reused buffer" is lowbit's own row (what its 4-bit layer
does). Dequantize GB/s counts output bytes; the yardstick is a plain copy of the same number of bytes (read +
write), the machine's practical bandwidth. The layer rows time forward + backward of one 4-bit linear layer
(bf16, 64 tokens, gradient to the input) against bitsandbytes' ``Linear4bit`` and against the bare matmuls.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit
from lowbit.nn import linear
from lowbit.quant import native, nf4
from lowbit.quant.spec import QUANT_TYPES

from common import machine, table, timeit, update_readme, write_json

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")
LAYER_SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in)
TOKENS = 64


def dequant_speed(n: int, r: int) -> tuple[list[dict], dict]:
    import bitsandbytes.functional as F

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:  # `make bench` installs it; without it the torchao row is left out
        to_nf4 = None
        print("torchao not installed: its row is left out (pip install -e '.[bench]')")
    torch.manual_seed(0)
    w32 = torch.randn(n, n) * 0.02
    rows, speed = [], {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).split(".")[-1]
        w = w32.to(dt)
        out = torch.empty(n, n, dtype=dt)
        nbytes = out.numel() * out.element_size()
        src = torch.empty_like(out)
        q = lowbit.quantize(w)
        am = q.absmax_float()
        bp, st = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        tao = to_nf4(w, 64, 256) if to_nf4 else None
        assert torch.equal(q.packed, bp), "lowbit and bitsandbytes disagree"
        res = {
            "copy": (None, timeit(lambda: out.copy_(src), r)),
            "lowbit": (timeit(lambda: lowbit.quantize(w), r), timeit(lambda: q.dequantize(dt), r)),
            "lowbit, into a reused buffer": (None, timeit(lambda: q.dequantize(dt, out=out), r)),
            "lowbit-torch-path": (None, timeit(lambda: nf4.dequantize_torch(q.packed, am, q.code, 64, q.shape, dt),
                                               r)),
            "bitsandbytes": (timeit(lambda: F.quantize_4bit(w, quant_type="nf4", compress_statistics=True), r),
                             timeit(lambda: F.dequantize_4bit(bp, st), r)),
        }
        if tao is not None:
            res["torchao-NF4Tensor"] = (timeit(lambda: to_nf4(w, 64, 256), r),
                                        timeit(lambda: tao.get_original_weight(), r))
        copy_gbs = nbytes / res["copy"][1] / 1e9
        for peer, (tq, td) in res.items():
            gbs = nbytes / td / 1e9
            rows.append({"dtype": name, "impl": peer, "quantize_ms": round(tq * 1e3, 1) if tq else "",
                         "dequant_ms": round(td * 1e3, 2), "dequant_GB/s": round(gbs, 1),
                         "% of copy": round(100 * gbs / copy_gbs)})
            speed.setdefault(name, {})[peer] = {"quantize_s": tq, "dequantize_s": td, "dequantize_GBps": gbs}
        sp = speed[name]
        sp["lowbit_vs_bnb"] = sp["bitsandbytes"]["dequantize_s"] / sp["lowbit"]["dequantize_s"]
        sp["buffered_vs_bnb"] = sp["bitsandbytes"]["dequantize_s"] / sp["lowbit, into a reused buffer"]["dequantize_s"]
    return rows, speed


def kbit_speed(n: int, r: int) -> tuple[list[dict], dict]:
    """Dequantize into a reused buffer (what the 4-bit layer does) for each storage width: NF4, NF3, NF2 + DQ."""
    torch.manual_seed(0)
    w = torch.randn(n, n) * 0.02
    rows, res = [], {}
    for dt in (torch.float32, torch.bfloat16):
        name = str(dt).split(".")[-1]
        out, src = torch.empty(n, n, dtype=dt), torch.empty(n, n, dtype=dt)
        nbytes = out.numel() * out.element_size()
        copy_gbs = nbytes / timeit(lambda: out.copy_(src), r) / 1e9
        for qt in ("nf4", "nf3", "nf2", "int3", "int2"):  # int: the zero points' extra float32 pass included
            q = lowbit.quantize(w.to(dt), qt)
            gbs = nbytes / timeit(lambda: q.dequantize(dt, out=out), r) / 1e9
            rows.append({"dtype": name, "type": qt, "stored_bits/param": round(q.bits_per_param, 3),
                         "dequant_GB/s": round(gbs, 1), "% of copy": round(100 * gbs / copy_gbs)})
            res.setdefault(name, {})[qt] = {"dequantize_GBps": gbs, "copy_GBps": copy_gbs,
                                            "bits_per_param": q.bits_per_param}
    return rows, res


def layer_speed(r: int) -> tuple[list[dict], dict]:
    """Forward + backward (to the input) of one frozen 4-bit layer, bf16, TOKENS tokens."""
    import bitsandbytes as bnb

    rows, res = [], {}
    fresh = lambda q, dtype: q.dequantize(dtype)  # the layer as it was: a new full-size tensor per call
    for out_f, in_f in LAYER_SHAPES:
        torch.manual_seed(0)
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        ours = linear.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
        peer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                 compress_statistics=True)
        peer.load_state_dict(lin.state_dict())
        peer = peer.to("cpu").train()  # quantizes; never eval mode on this CPU (DESIGN.md §5)
        w = ours.dequantize(torch.bfloat16)
        x = torch.randn(TOKENS, in_f, dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn(TOKENS, out_f, dtype=torch.bfloat16)

        def step(layer):
            layer(x).backward(gy)
            x.grad = None

        def matmuls():
            (x.detach() @ w.t(), gy @ w)

        t = {"matmuls only (weight already bf16)": timeit(matmuls, r),
             "lowbit Linear4bit": timeit(lambda: step(ours), r)}
        real = linear._dequantized
        linear._dequantized = fresh
        try:
            t["lowbit, fresh dequantize output per call"] = timeit(lambda: step(ours), r)
        finally:
            linear._dequantized = real
        t["bitsandbytes Linear4bit"] = timeit(lambda: step(peer), r)
        key = f"{out_f}x{in_f}"
        res[key] = {**t, "lowbit_vs_bnb": t["bitsandbytes Linear4bit"] /
                    t["lowbit Linear4bit"], "lowbit_vs_matmuls": t["lowbit Linear4bit"] /
                    t["matmuls only (weight already bf16)"]}
        rows += [{"weight": key, "impl": k, "fwd+bwd_ms": round(v * 1e3, 2)} for k, v in t.items()]
    return rows, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    n = args.size
    rows, speed = dequant_speed(n, args.repeats)
    speed_md = table(rows, ["dtype", "impl", "quantize_ms", "dequant_ms", "dequant_GB/s", "% of copy"])
    print(f"NF4 + double quant, {n}x{n}, {machine()}; native kernel: {'yes' if native.kernel() else 'no'}\n")
    print(speed_md)
    krows, kbit = kbit_speed(n, args.repeats)
    kbit_md = table(krows, ["dtype", "type", "stored_bits/param", "dequant_GB/s", "% of copy"])
    print(f"\nDequantize into a reused buffer, by storage width (C kernel), {n}x{n}\n\n{kbit_md}")
    lrows, layers = layer_speed(args.repeats)
    layer_md = table(lrows, ["weight", "impl", "fwd+bwd_ms"])
    print(f"\nOne 4-bit layer, forward + backward, bf16, {TOKENS} tokens\n\n{layer_md}")

    err_rows, errors = [], {}
    g = torch.randn(4096, 1024)
    for qt in QUANT_TYPES:
        for dq in (False, True):
            q = lowbit.quantize(g, qt, 64, double_quant=dq)
            e = ((q.dequantize() - g).norm() / g.norm()).item()
            errors[f"{qt}{'+dq' if dq else ''}"] = {"rel_frobenius_error": e, "bits_per_param": q.bits_per_param,
                                                   "info_bits": q.info_bits}
            err_rows.append({"type": qt, "double_quant": dq, "rel_error": round(e, 4),
                             "stored_bits/param": round(q.bits_per_param, 3), "info_bits": q.info_bits})
    print("\nRelative Frobenius error on a Gaussian 4096x1024 weight, blocksize 64\n")
    err_md = table(err_rows, ["type", "double_quant", "rel_error", "stored_bits/param", "info_bits"])
    print(err_md)
    lines = [f"{name}: lowbit dequantize = {speed[name]['lowbit_vs_bnb']:.1f}x bitsandbytes (both allocating), "
             f"{speed[name]['buffered_vs_bnb']:.1f}x into a reused buffer"
             for name in speed]
    lines += [f"layer {k}: lowbit = {v['lowbit_vs_bnb']:.2f}x bitsandbytes, "
              f"{v['lowbit_vs_matmuls']:.2f}x the matmuls' time" for k, v in layers.items()]
    print("\n" + "\n".join(lines))
    if n == 4096:
        update_readme("quant", f"{speed_md}\n\nDequantize into a reused buffer by storage width (NF3: 8 codes in 3 "
                      f"bytes, NF2: 4 per byte; INT3 / INT2 pack so, and subtract their zero points in float32 after "
                      f"the kernel, a chunk at a time; C kernel):\n\n{kbit_md}\n\n"
                      f"One 4-bit layer, forward + backward (gradient to the input), bf16, "
                      f"{TOKENS} tokens:\n\n{layer_md}\n\n{'; '.join(lines)}.\n\nRelative Frobenius error on a "
                      f"Gaussian 4096×1024 weight, blocksize 64:\n\n{err_md}")
    path = write_json("quant", {"machine": machine(), "size": n, "speed": speed, "kbit": kbit, "layers": layers,
                                 "errors": errors})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
