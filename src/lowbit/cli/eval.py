"""``lowbit eval --model M [--adapter DIR] --datasets FILE``: held-out loss and perplexity of a data file."""

from __future__ import annotations

import json
import math

from .options import MODEL_KEYS, add_config_flags, config_from, load_model

HELP = "loss and perplexity on a data file"


def add_parser(sub, name):
    p = sub.add_parser(name, help=HELP, description="Loss and perplexity of the model (and adapter) on a data "
                       "file, every record once.")
    p.add_argument("--adapter", help="PEFT adapter folder")
    p.add_argument("--force", action="store_true", help="apply an adapter trained on another base")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_config_flags(p, (*MODEL_KEYS, "datasets", "dataset_format", "sequence_len", "micro_batch_size"),
                     required=("base_model", "datasets"))
    return p


def run(args) -> int:
    from ..data.batching import Batches
    from ..data.sources import parse_sources
    from ..data.table import source_tables
    from ..dtypes import to_torch
    from ..io.tokenizer import tokenizer_for
    from ..training.evaluation import evaluate

    cfg = config_from(args)
    tok = tokenizer_for(cfg.base_model, args.adapter)
    data = source_tables(parse_sources(cfg.datasets, cfg.dataset_format), tok, 0, sequence_len=cfg.sequence_len)
    net = load_model(cfg, args.adapter, args.force)  # after the data: a bad file fails before the model loads
    loss = evaluate(net, Batches(data.train, cfg.micro_batch_size, tok.pad_token_id), to_torch(cfg.compute_dtype))
    res = {"loss": loss, "perplexity": math.exp(min(loss, 50)), "samples": len(data.train),
           "truncated": data.truncated}
    print(json.dumps(res) if args.json else f"loss {loss:.4f}  perplexity {res['perplexity']:.2f}  "
          f"({len(data.train)} samples)")
    return 0
