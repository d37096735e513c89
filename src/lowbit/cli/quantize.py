"""``lowbit quantize --model M --out DIR [--calibrate DATA [--method awq+clip+gptq|blockwise|…]]``: a 4-bit
checkpoint that transformers + bitsandbytes load as it is; with ``--calibrate``, its weights are calibrated under the
model's inputs on DATA — AWQ's activation-aware scales folded into the norms, clipped block scales, GPTQ's
error-compensating rounding, block scales and rounding trained per decoder block, or all block scales trained end to
end against the float model — and it is still a plain
bitsandbytes checkpoint (train on it with ``base_model: DIR``)."""

from __future__ import annotations

from ..quant.spec import CALIBRATIONS, calibration_stages
from .options import add_config_flags, config_from

HELP = "write a 4-bit checkpoint transformers + bitsandbytes load as-is (NF3/NF2: lowbit's own)"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--calibrate", metavar="DATA", help="calibration data (a file, folder or built-in name, as "
                   "datasets takes it): calibrate the 4-bit weights under the model's inputs on it")
    p.add_argument("--method", default="gptq", help="a stage or stages joined by '+' (in this order): " + "; ".join(
        f"{k}: {v}" for k, v in CALIBRATIONS.items() if k != "none"))
    p.add_argument("--samples", type=int, default=256, help="calibration samples (default 256)")
    add_config_flags(p, ("base_model", "quant_type", "blocksize", "double_quant", "compute_dtype",
                         "trust_remote_code", "sequence_len", "dataset_format"), required=("base_model",))
    return p


def run(args) -> int:
    from ..dtypes import to_torch
    from ..io.calibration import calibrate
    from ..io.export import save_quantized
    from ..io.loader import load
    from ..io.tokenizer import load_tokenizer
    from ..nn.linear import footprint_bytes

    cfg = config_from(args)
    if args.calibrate:
        calibration_stages(args.method, "--method")
    spec = cfg.quant_spec()
    tok = load_tokenizer(cfg.base_model, required=args.calibrate is not None)
    batches = _calibration(args, cfg, tok) if args.calibrate else None  # a bad file fails before the model loads
    # the compute dtype is also the one the norms and embeddings are saved in
    dtype = to_torch(cfg.compute_dtype)
    net = load(cfg.base_model, spec, compute_dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    how = "round to nearest"
    if batches:
        calibrate(net, batches, args.method)
        how = f"{args.method} calibration on {sum(len(b['input_ids']) for b in batches)} samples of {args.calibrate}"
    out = save_quantized(net, args.out, tokenizer=tok, overwrite=args.overwrite)
    who = "transformers + bitsandbytes and lowbit" if spec.info.bitsandbytes else \
        f"lowbit (bitsandbytes has no {spec.quant_type})"
    print(f"wrote {out}: {spec}, {how}, {footprint_bytes(net) / 2**20:.1f} MiB of weights (loadable with {who})")
    return 0


def _calibration(args, cfg, tok) -> list:
    """The first ``--samples`` samples of ``--calibrate`` in a seeded order, in batches of 8."""
    from ..data.batching import sample_batches
    from ..data.sources import parse_sources
    from ..data.table import source_tables
    from ..errors import LowbitError

    if args.samples <= 0:
        raise LowbitError(f"--samples must be > 0, got {args.samples}")
    data = source_tables(parse_sources(args.calibrate, cfg.dataset_format), tok, 0, sequence_len=cfg.sequence_len)
    return sample_batches(data.train, tok.pad_token_id, args.samples)
