"""Quantize / dequantize speed for a 4096×4096 weight, lowbit vs bitsandbytes vs torchao, and the error of
each data type. All peers are measured in the same run; medians of ≥ 5 repeats after warm-up.

    python bench/quant.py [--repeats 7] [--size 4096]

Dequantize GB/s counts output bytes. The yardstick is a plain copy of the same number of bytes (read +
write), the machine's practical bandwidth.
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
from lowbit.quant import native, nf4

from common import machine, table, timeit, update_readme, write_json

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    import bitsandbytes.functional as F

    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    except ImportError:  # `make bench` installs it; without it the torchao row is left out
        to_nf4 = None
        print("torchao not installed: its row is left out (pip install -e '.[bench]')")

    torch.manual_seed(0)
    n = args.size
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
        r = args.repeats
        res = {
            "copy": (None, timeit(lambda: out.copy_(src), r)),
            "lowbit": (timeit(lambda: lowbit.quantize(w), r), timeit(lambda: q.dequantize(dt, out=out), r)),
            "lowbit-torch-path": (None, timeit(lambda: nf4.dequantize_torch(q.packed, am, q.code, 64, q.shape, dt,
                                                                            out), r)),
            "bitsandbytes": (timeit(lambda: F.quantize_4bit(w, quant_type="nf4", compress_statistics=True), r),
                             timeit(lambda: F.dequantize_4bit(bp, st), r)),
        }
        if tao is not None:
            res["torchao-NF4Tensor"] = (timeit(lambda: to_nf4(w, 64, 256), r),
                                        timeit(lambda: tao.get_original_weight(), r))
        copy_gbs = nbytes / res["copy"][1] / 1e9
        for peer, (tq, td) in res.items():
            gbs = nbytes / td / 1e9
            row = {"dtype": name, "impl": peer, "quantize_ms": round(tq * 1e3, 1) if tq else "",
                   "dequant_ms": round(td * 1e3, 2), "dequant_GB/s": round(gbs, 1),
                   "% of copy": round(100 * gbs / copy_gbs)}
            rows.append(row)
            speed.setdefault(name, {})[peer] = {"quantize_s": tq, "dequantize_s": td, "dequantize_GBps": gbs}
        s = speed[name]
        s["lowbit_vs_bnb"] = s["lowbit"]["dequantize_GBps"] / s["bitsandbytes"]["dequantize_GBps"]
    speed_md = table(rows, ["dtype", "impl", "quantize_ms", "dequant_ms", "dequant_GB/s", "% of copy"])
    print(f"NF4 + double quant, {n}x{n}, {machine()}; native kernel: {'yes' if native.kernel() else 'no'}\n")
    print(speed_md)

    err_rows, errors = [], {}
    g = torch.randn(4096, 1024)
    for qt in ["nf4", "fp4", "int4", "nf3", "nf2"]:
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
    lines = [f"{name}: lowbit dequantize = {speed[name]['lowbit_vs_bnb']:.1f}x bitsandbytes, "
             f"{100 * speed[name]['lowbit']['dequantize_GBps'] / speed[name]['copy']['dequantize_GBps']:.0f}% of copy "
             "bandwidth"
             for name in speed]
    print("\n" + "\n".join(lines))
    if n == 4096:
        update_readme("quant", f"{speed_md}\n\n{'; '.join(lines)}.\n\nRelative Frobenius error on a Gaussian "
                      "4096×1024 "
                      f"weight, blocksize 64:\n\n{err_md}")
    path = write_json("quant", {"machine": machine(), "size": n, "speed": speed, "errors": errors})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
