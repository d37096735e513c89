"""``lowbit merge --model M --adapter DIR --out DIR``: fold the adapter into the dequantized base and write a
plain Hugging Face folder (the tokenizer copied when the model has one)."""

from __future__ import annotations

from .options import MODEL_KEYS, add_config_flags, config_from, load_model

HELP = "fold an adapter into the dequantized base; write a plain HF folder"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP)
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bf16", help="of the merged weights: bf16, fp16 or fp32")
    p.add_argument("--requantize", action="store_true", help="also write a 4-bit copy (quant_type) and report how "
                   "much re-quantizing changes the model")
    p.add_argument("--overwrite", action="store_true")
    add_config_flags(p, MODEL_KEYS, required=("base_model",))
    return p


def run(args) -> int:
    from ..dtypes import canonical, to_torch
    from ..io.export import save_quantized
    from ..io.loader import load
    from ..io.merging import merge, merge_report
    from ..io.tokenizer import tokenizer_for
    from ..quant.spec import QuantSpec

    cfg = config_from(args)
    dtype = canonical(args.dtype, "--dtype")
    quant = QuantSpec(cfg.quant_type, cfg.blocksize, cfg.double_quant)
    # what is never quantized (embeddings, head, norms) is read straight into the output dtype: a float32 merge
    # carries them exactly, not rounded through a 16-bit compute dtype
    cfg.compute_dtype = dtype
    net = load_model(cfg, args.adapter, args.force, computes=False)  # dtype: the merged weights'
    tok = tokenizer_for(cfg.base_model, args.adapter, required=False)
    report = merge_report(net, tok, quant) if args.requantize else None
    out = merge(net, args.out, dtype=to_torch(dtype), tokenizer=tok, overwrite=args.overwrite)
    print(f"merged model written to {out} ({dtype}); load it with transformers.AutoModelForCausalLM.from_pretrained")
    if args.requantize:
        qout = save_quantized(load(out, quant), f"{args.out}-{quant.quant_type}", tokenizer=tok,
                              overwrite=args.overwrite)
        print(f"re-quantized ({quant}) copy written to {qout}")
        print(report)
    return 0
