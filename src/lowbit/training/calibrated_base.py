"""The base a run trains on when ``quant_calibration`` is set: the 4-bit base calibrated on the run's own
training data (``io/calibration.py``: GPTQ, AWQ or both), written once to ``output_dir/base`` and loaded from
there by every rank and by every resume, so all of them see the same bytes.

``output_dir/base`` is an ordinary checkpoint (transformers + bitsandbytes load NF4/FP4; lowbit loads NF3/NF2)
with the tokenizer: the adapter records it as its base, and ``lowbit merge/eval/generate --model
output_dir/base`` use it. The calibration samples are the first ``quant_calibration_samples`` training samples
in a seeded order (seed + 1, as ``lowbit quantize --calibrate`` takes them).
"""

from __future__ import annotations

import time
from pathlib import Path

from ..data.batching import sample_batches
from ..io.calibration import calibrate
from ..io.export import save_quantized
from ..io.loader import load
from .config import TrainConfig
from .distributed import World

__all__ = ["BASE_DIR", "calibrated_base"]

BASE_DIR = "base"


def calibrated_base(cfg: TrainConfig, out: Path, samples, tok, dtype, world: World, log=print,
                    device="cpu") -> str:
    """The model to load: ``cfg.base_model``, or with calibration the calibrated copy in ``out/base`` (made now
    by rank 0 unless a previous start of this run made it)."""
    if cfg.quant_calibration == "none":
        return cfg.base_model
    base = out / BASE_DIR
    if world.main and not (base / "config.json").exists():
        t0 = time.perf_counter()
        net = load(cfg.base_model, cfg.quant_spec(), compute_dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                   device=device)  # calibrated where the run computes
        batches = sample_batches(samples, tok.pad_token_id, cfg.quant_calibration_samples, cfg.seed + 1)
        calibrate(net, batches, cfg.quant_calibration, log=log)
        save_quantized(net, base, tokenizer=tok, overwrite=True)
        del net
        log(f"calibrated base ({cfg.quant_calibration} on {sum(len(b['input_ids']) for b in batches)} training "
            f"samples, {time.perf_counter() - t0:.0f} s) written to {base}: merge, eval and generate with "
            f"--model {base}")
    world.barrier()
    return str(base)
