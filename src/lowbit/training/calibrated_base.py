"""The base a run trains on when ``quant_calibration`` is set: the 4-bit base calibrated on the run's own
training data (``io/calibration.py``: GPTQ, AWQ or both), written once to ``output_dir/base`` and loaded from
there by every rank and by every resume, so all of them see the same bytes.

``output_dir/base`` is an ordinary checkpoint (transformers + bitsandbytes load NF4/FP4; lowbit loads NF3/NF2)
with the tokenizer: the adapter records it as its base, and ``lowbit merge/eval/generate --model
output_dir/base`` use it. The calibration samples are the first ``quant_calibration_samples`` training samples
in a seeded order (seed + 1, as ``lowbit quantize --calibrate`` takes them). With ``blockwise`` or ``e2e`` and
``lora_init: loftq`` the LoRA start is trained with the codes or scales (``io/blockwise.py``, ``io/e2e.py``) and
kept beside them in ``base/lora_start.safetensors``; the run's adapter starts from it.
"""

from __future__ import annotations

import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..data.batching import sample_batches
from ..errors import LowbitError
from ..io.calibration import calibrate
from ..io.export import save_quantized
from ..io.loader import load
from ..nn.lora import select_targets
from ..nn.lora_options import lora_scaling
from ..quant.spec import calibration_stages
from .config import TrainConfig
from .distributed import World

__all__ = ["BASE_DIR", "START_FILE", "calibrated_base", "lora_start"]

BASE_DIR = "base"
START_FILE = "lora_start.safetensors"  # blockwise/e2e with lora_init: loftq — the LoRA start trained with the codes


def _scaling(cfg: TrainConfig) -> float:
    return lora_scaling(cfg.lora_r, cfg.lora_alpha, cfg.use_rslora)


def _wants_start(cfg: TrainConfig) -> bool:
    return cfg.lora_init == "loftq" and bool({"blockwise", "e2e"} & set(calibration_stages(cfg.quant_calibration)))


def _lora(cfg: TrainConfig, net) -> tuple | None:
    """(r, scaling, target names) for blockwise / e2e calibration to train the run's LoRA start; None otherwise."""
    if not _wants_start(cfg):
        return None
    return cfg.lora_r, _scaling(cfg), set(select_targets(net, cfg.lora_target_modules, cfg.lora_r))


def lora_start(cfg: TrainConfig, base: str) -> dict[str, tuple] | None:
    """name → (A, B): the LoRA start blockwise / e2e calibration trained for this run (None when it did not)."""
    path = Path(base) / START_FILE
    if cfg.quant_calibration == "none" or not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("r") != str(cfg.lora_r) or float(meta.get("scaling", "nan")) != _scaling(cfg):
            raise LowbitError(f"{path}: a LoRA start for r={meta.get('r')}, scaling {meta.get('scaling')}; this run "
                              f"has r={cfg.lora_r}, scaling {_scaling(cfg)} (remove {base} to calibrate again)")
        names = {k.rpartition(".")[0] for k in f.keys()}
        return {n: (f.get_tensor(f"{n}.lora_A"), f.get_tensor(f"{n}.lora_B")) for n in names}


def calibrated_base(cfg: TrainConfig, out: Path, samples, tok, dtype, world: World, log=print,
                    device="cpu") -> str:
    """The model to load: ``cfg.base_model``, or with calibration the calibrated copy in ``out/base`` (made now
    by rank 0 unless a previous start of this run made it)."""
    if cfg.quant_calibration == "none":
        return cfg.base_model
    base = out / BASE_DIR
    made = (base / "config.json").exists() and (not _wants_start(cfg) or (base / START_FILE).exists())
    if world.main and not made:  # (a start killed between the two writes makes it again)
        t0 = time.perf_counter()
        net = load(cfg.base_model, cfg.quant_spec(), compute_dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                   device=device)  # calibrated where the run computes
        batches = sample_batches(samples, tok.pad_token_id, cfg.quant_calibration_samples, cfg.seed + 1)
        starts = calibrate(net, batches, cfg.quant_calibration, log=log, lora=_lora(cfg, net))
        save_quantized(net, base, tokenizer=tok, overwrite=True)
        if starts:
            tensors = {f"{n}.{k}": t.contiguous() for n, pair in starts.items()
                       for k, t in zip(("lora_A", "lora_B"), pair)}
            save_file(tensors, str(base / START_FILE), metadata={"r": str(cfg.lora_r), "scaling": repr(_scaling(cfg))})
        del net
        log(f"calibrated base ({cfg.quant_calibration} on {sum(len(b['input_ids']) for b in batches)} training "
            f"samples, {time.perf_counter() - t0:.0f} s) written to {base}: merge, eval and generate with "
            f"--model {base}")
    world.barrier()
    return str(base)
