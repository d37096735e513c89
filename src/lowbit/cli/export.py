"""``lowbit export --model M [--adapter DIR] --out FILE.gguf [--type f16] [--ollama]``: merge the adapter into
the dequantized base and write one GGUF file llama.cpp (and Ollama, LM Studio) runs; ``--ollama`` also writes a
Modelfile beside it. Unsupported architectures and types are refused before the model loads."""

from __future__ import annotations

from .options import MODEL_KEYS, add_config_flags, config_from, load_model

HELP = "merge an adapter and write a GGUF file for llama.cpp / Ollama"
FORMATS = ("gguf",)


def add_parser(sub, name):
    from ..io.gguf_types import GGUF_TYPES

    p = sub.add_parser(name, help=HELP)
    p.add_argument("--adapter", help="PEFT adapter folder (none: export the base)")
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--format", default="gguf", choices=FORMATS)
    p.add_argument("--type", default="f16", help=f"tensor type: {', '.join(GGUF_TYPES)}")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the file")
    p.add_argument("--overwrite", action="store_true")
    add_config_flags(p, MODEL_KEYS, required=("base_model",))
    return p


def run(args) -> int:
    from pathlib import Path

    from transformers import AutoConfig

    from ..atomic import writing_file
    from ..errors import LowbitError
    from ..io.gguf_arch import gguf_arch
    from ..io.gguf_export import export_gguf
    from ..io.gguf_types import check_gguf_type
    from ..io.gguf_vocab import check_vocab
    from ..io.ollama import modelfile
    from ..io.resolve import resolve_model
    from ..io.tokenizer import tokenizer_for

    cfg = config_from(args)
    out = Path(args.out)
    check_gguf_type(args.type)
    if out.suffix.lower() != ".gguf":
        raise LowbitError(f"--out {out}: name the file *.gguf")
    for path in [out] + ([out.with_name("Modelfile")] if args.ollama else []):
        if path.exists() and not args.overwrite:
            raise LowbitError(f"{path}: exists (use --overwrite to replace it)")
    folder = resolve_model(cfg.base_model)
    gguf_arch(AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code))  # refuse before loading
    tok = tokenizer_for(cfg.base_model, args.adapter)
    check_vocab(tok)  # refuse before loading
    if cfg.compute_dtype == "auto":
        cfg.compute_dtype = "float32"  # norms and embeddings unrounded; the matrices merge in float32 anyway
    net = load_model(cfg, args.adapter, args.force)
    info = export_gguf(net, out, tok, args.type)
    print(f"GGUF ({args.type}, {info['architecture']}, pre-tokenizer {info['pre_tokenizer']}) written to {out} "
          f"({info['bytes'] / 2**20:.1f} MiB); run it with: llama-cli -m {out}")
    if args.ollama:
        text, fmt = modelfile(out.name, getattr(tok, "chat_template", None), tok.eos_token)
        with writing_file(out.with_name("Modelfile")) as tmp:
            tmp.write_text(text)
        how = f"{fmt} template" if fmt else "template read from the GGUF"
        print(f"Ollama Modelfile ({how}) written to {out.with_name('Modelfile')}; then: "
              f"ollama create {out.stem} -f {out.with_name('Modelfile')}")
    return 0
