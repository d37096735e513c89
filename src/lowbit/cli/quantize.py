"""``lowbit quantize --model M --out DIR``: a 4-bit checkpoint that transformers + bitsandbytes load as it is."""

from __future__ import annotations

from .options import add_config_flags, config_from

HELP = "write a 4-bit checkpoint transformers + bitsandbytes load as-is"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    add_config_flags(p, ("base_model", "quant_type", "blocksize", "double_quant", "trust_remote_code"),
                     required=("base_model",))
    return p


def run(args) -> int:
    from ..io.export import save_quantized
    from ..io.loader import load
    from ..io.tokenizer import load_tokenizer
    from ..nn.linear import footprint_bytes

    cfg = config_from(args)
    spec = cfg.quant_spec()
    net = load(cfg.base_model, spec, trust_remote_code=cfg.trust_remote_code)
    tok = load_tokenizer(cfg.base_model, required=False)
    out = save_quantized(net, args.out, tokenizer=tok, overwrite=args.overwrite)
    print(f"wrote {out}: {spec}, {footprint_bytes(net) / 2**20:.1f} MiB of weights "
          "(loadable with transformers + bitsandbytes)")
    return 0
