"""Every Triton kernel compiled for real GPUs on this machine (no GPU needed: Triton's wheel ships ptxas), with the
signatures the dispatch points launch them with — so a kernel that only the interpreter accepts cannot hide — for
Ampere (sm_80) and Hopper (sm_90). The PTX is checked for what byte equality needs: correctly rounded division in the
quantize kernels, no fused multiply-add where the launch turns FP fusion off."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # ~1 min: one compile per kernel, signature and target

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowbit.quant import triton_dequant as d, triton_quant as q

P = {"fp32": "*fp32", "bf16": "*i16", "fp16": "*fp16"}
cases = []
for kind, out in ((0, "*fp32"), (1, "*i16"), (2, "*fp16")):
    for double in (False, True):
        sig = {"packed": "*u8", "absmax": "*fp32", "qabsmax": "*u8", "nested": "*fp32", "ncode": "*fp32",
               "offset": "fp32", "code": "*fp32", "out": out, "n_bytes": "i32", "n": "i32"}
        cases.append(("dequant4", d._dequant4, sig, {"BLOCKSIZE": 64, "NESTED": 256, "DOUBLE": double,
                                                      "KIND": kind, "BYTES": d.BYTES}, double))
        sig = {k: v for k, v in sig.items() if k != "n_bytes"}
        for bits in (3, 2):
            cases.append((f"dequant{bits}", d._dequant_k, sig, {"BITS": bits, "BLOCKSIZE": 64, "NESTED": 256,
                                                                "DOUBLE": double, "KIND": kind,
                                                                "ELEMS": 2 * d.BYTES}, double))
for dt in ("*fp32", "*bf16", "*fp16"):
    for bits, nmid in ((4, 15), (3, 7), (2, 3)):
        sig = {"w": dt, "absmax_out": "*fp32", "packed": "*u8", "mid": "*fp32", "order": "*i32", "n": "i32"}
        cases.append((f"quant{bits}", q._codes, sig, {"BLOCKSIZE": 64, "NMID": nmid, "BITS": bits,
                                                      "IDENTITY": bits != 4}, False))
    cases.append(("rows8", q._rows8, {"w": dt, "q": "*i8", "scb": "*fp32", "cols": "i32"}, {"COLS": 1024}, False))
results = []
for arch in (80, 90):
    for name, fn, sig, const, nofma in cases:
        full = {**sig, **{k: "constexpr" for k in const}}
        k = triton.compile(ASTSource(fn=fn, signature=full, constexprs=const), target=GPUTarget("cuda", arch, 32),
                           options={"enable_fp_fusion": False})
        ptx = k.asm["ptx"]
        results.append({"kernel": name, "arch": arch, "cubin": len(k.asm["cubin"]),
                        "div_rn": "div.rn.f32" in ptx, "fma": "fma.rn.f32" in ptx, "nofma": nofma})
print("RESULTS " + json.dumps(results))
"""


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    assert {r["arch"] for r in rows} == {80, 90} and all(r["cubin"] > 0 for r in rows)
    assert {r["kernel"] for r in rows} == {"dequant4", "dequant3", "dequant2", "quant4", "quant3", "quant2", "rows8"}
    assert all(r["div_rn"] for r in rows if r["kernel"].startswith(("quant", "rows8")))
    assert not any(r["fma"] for r in rows if r["nofma"]), "a double-quantized scale was fused into an FMA"
