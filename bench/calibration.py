"""The pure quantization cost of SmolLM2-135M-Instruct before any training: held-out loss of the base in 16 bits,
in NF4 + DQ rounded to nearest, and in NF4 + DQ with GPTQ's error-compensating rounding on the same grid
(calibrated on training dialogues), and the calibration's wall time. The retention table's held-out set
(chatterbot, 5 %, seed 0).

    python bench/calibration.py [--samples 256]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, table


def render(rows: list[dict], n_valid: int, n_calib: int) -> str:
    shown = [{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return table(shown, list(rows[0])) + (
        f"\n\nSmolLM2-135M-Instruct, bf16 compute, {n_valid} held-out chatterbot dialogues; GPTQ calibrated on "
        f"{n_calib} training dialogues (their inputs to each 4-bit layer), damping 0.01, 2 threads; the GPTQ "
        "weights keep round-to-nearest's double-quantized scales (a plain bitsandbytes NF4 checkpoint).")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256, help="calibration dialogues from the training split")
    ap.add_argument("--readme", action="store_true")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    from lowbit.data.batching import Batches, sample_batches
    from lowbit.data.sources import parse_sources
    from lowbit.data.table import source_tables
    from lowbit.io.calibration import calibrate_gptq
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.quant.spec import QuantSpec
    from lowbit.training.evaluation import evaluate

    tok = load_tokenizer("smollm2-135m")
    data = source_tables(parse_sources("chatterbot"), tok, 0.05, 0, 256)
    valid = Batches(data.valid, 8, tok.pad_token_id)
    calib_batches = sample_batches(data.train, tok.pad_token_id, args.samples)
    rows = []
    for name, spec in [("16-bit (bf16)", None), ("NF4 + DQ, round to nearest", QuantSpec()),
                       ("NF4 + DQ, GPTQ rounding", QuantSpec())]:
        net = load("smollm2-135m", spec, compute_dtype=torch.bfloat16).eval()
        took = "—"
        if "GPTQ" in name:
            t0 = time.perf_counter()
            calibrate_gptq(net, calib_batches, log=lambda *a: None)
            took = f"{time.perf_counter() - t0:.0f}"
        loss = evaluate(net, valid, torch.bfloat16)
        rows.append({"weights": name, "held-out loss before training": round(loss, 4), "calibration s": took})
        print(rows[-1], flush=True)
    base = rows[0]["held-out loss before training"]
    for r in rows:
        r["cost vs 16-bit"] = f"{100 * (r['held-out loss before training'] / base - 1):+.2f} %"
    md = render(rows, len(data.valid), len(calib_batches) * 8)
    publish("calibration", md, {"rows": rows}, args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
