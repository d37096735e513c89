"""Passkey retrieval past a model's native length, before and after a short QLoRA fine-tune with RoPE scaling.

SmolLM2-135M-Instruct (8,192 native positions) with RoPE scaling (``--rope``: linear, or yarn — which keeps the
fast-turning dimensions that resolve nearby positions as they were and interpolates only the slow ones) to
``--factor`` × native (``model_config: {rope_scaling: {rope_type: R, factor: F}, max_position_embeddings:
F × native}``; yarn's original length is the native one), NF4 +
double quantization, LoRA r=16 all-linear. Data: the built-in passkey task at F × native tokens (a 5-digit key
hidden at a seeded depth in plain text, the question at the end); the last ``--eval`` documents are held out, the
rest train. The fine-tune runs as a user runs it: ``lowbit train`` on a YAML config (batch 1, gradient
checkpointing, tiled MLP, loss on the answer), ``--steps`` optimizer steps. ``--train-tokens N`` trains on passkey
documents of N tokens instead (the same scaling and positions, held-out documents still at F × native): a step of
4,096 tokens costs a tenth of one at 32,768 here, so many more steps fit the same minutes; ``--train-on-inputs``
puts the loss on every token (the filler is running text that repeats, so most of it is predicted by copying
from earlier in the document — the skill retrieval needs).

Retrieval is scored on the held-out documents with one forward each (teacher-forced): a document is retrieved when
the greedy choice at every answer token (the five digits and the end of the turn) is the right one — what greedy
decoding would answer — and the answer's mean negative log-likelihood is reported beside it. The same documents
are also scored at the native length without scaling (the base model's own ability, for reference: documents of
the native length's passkey task, same held-out positions).

    python bench/passkey.py [--factor 4] [--rope linear|yarn] [--steps 4] [--eval 4] [--lr 2e-4] [--train-tokens N]
                            [--train-on-inputs] [--readme]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish, run_worker, table, vm_hwm_bytes

MODEL, R = "smollm2-135m", 16


def _records(tokens: int, count: int) -> list[dict]:
    from lowbit.data.builtin import passkey

    return [r.data for r in passkey(tokens, count)]


def _model_config(tokens: int, factor: float, rope: str) -> dict | None:
    """``rope`` RoPE scaling by ``factor`` to ``tokens`` positions (None: the model as it is)."""
    if factor == 1:
        return None
    return {"rope_scaling": {"rope_type": rope, "factor": factor}, "max_position_embeddings": tokens}


def score_worker(data: str, tokens: int, factor: float, rope: str, adapter: str) -> dict:
    """Teacher-forced retrieval of every document in ``data`` (a JSONL of chat records) by the base (with the
    scaling) and ``adapter`` ('-' for none)."""
    import torch

    from lowbit.cli.options import load_model
    from lowbit.data.batching import Batches
    from lowbit.data.sources import parse_sources
    from lowbit.data.table import source_tables
    from lowbit.dtypes import to_torch
    from lowbit.generation import split_head
    from lowbit.io.tokenizer import tokenizer_for
    from lowbit.training.config import TrainConfig

    adapter = None if adapter == "-" else adapter
    cfg = TrainConfig(base_model=MODEL, model_config=_model_config(tokens, factor, rope), sequence_len=tokens,
                      datasets=data, val_set_size=0)
    tok = tokenizer_for(cfg.base_model, adapter)
    table_ = source_tables(parse_sources(cfg.datasets, "chat"), tok, 0, sequence_len=tokens).train
    net = load_model(cfg, adapter)
    net.eval()
    body, head = split_head(net)
    dtype = to_torch(cfg.compute_dtype)
    docs, t = [], time.perf_counter()
    batches = Batches(table_, 1, tok.pad_token_id)
    for batch in map(batches.batch, batches.sequential()):
        ids, labels = batch["input_ids"], batch["labels"]
        at = (labels[0, 1:] != -100).nonzero().flatten()  # position p predicts token p + 1
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            h = body(input_ids=ids, use_cache=False).last_hidden_state[0, at]
            logp = torch.log_softmax(head(h).float(), -1)
        target = labels[0, at + 1]
        docs.append({"tokens": ids.shape[1], "retrieved": bool((logp.argmax(-1) == target).all()),
                     "digits_right": int((logp.argmax(-1) == target)[:5].sum()),
                     "answer_nll": float(-logp.gather(1, target[:, None]).mean())})
    return {"docs": docs, "seconds": time.perf_counter() - t, "peak_rss_bytes": vm_hwm_bytes()}


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows))
    return str(path)


def _train(work: Path, train_file: str, tokens: int, factor: float, a) -> dict:
    """``lowbit train`` on the training documents (rows of ``a.train_tokens``, positions for ``tokens``); the adapter
    folder, wall time and per-step losses."""
    import yaml

    cfg = {"base_model": MODEL, "model_config": _model_config(tokens, factor, a.rope),
           "datasets": [{"path": train_file, "type": "chat"}], "val_set_size": 0,
           "sequence_len": a.train_tokens, "train_on_inputs": a.train_on_inputs,
           "micro_batch_size": 1, "gradient_checkpointing": True, "tiled_mlp": True, "lora_r": R,
           "lora_alpha": 2 * R, "learning_rate": a.lr, "max_steps": a.steps, "warmup_steps": 0,
           "lr_scheduler": "constant", "eval_steps": 0, "save_steps": 0, "seed": 0, "output_dir": str(work / "run")}
    (work / "train.yaml").write_text(yaml.safe_dump(cfg))
    t = time.time()
    p = subprocess.run([sys.executable, "-m", "lowbit", "train", str(work / "train.yaml")], capture_output=True,
                       text=True)
    if p.returncode:
        sys.exit(f"lowbit train failed:\n{p.stderr[-3000:]}")
    steps = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [round(s["loss"], 4) for s in steps if "loss" in s and "step" in s]
    return {"adapter": str(work / "run"), "seconds": time.time() - t, "losses": losses}


def _row(label: str, res: dict) -> dict:
    docs = res["docs"]
    return {"model": label, "documents": len(docs), "tokens": f"{min(d['tokens'] for d in docs):,}–"
            f"{max(d['tokens'] for d in docs):,}", "retrieved": sum(d["retrieved"] for d in docs),
            "digits_right_%": round(100 * sum(d["digits_right"] for d in docs) / (5 * len(docs)), 1),
            "answer_nll": round(sum(d["answer_nll"] for d in docs) / len(docs), 3),
            "s_per_doc": round(res["seconds"] / len(docs), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--factor", type=float, default=4.0)
    ap.add_argument("--rope", choices=("linear", "yarn"), default="linear")
    ap.add_argument("--native", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--docs", type=int, default=50, help="documents generated (the last --eval are held out)")
    ap.add_argument("--eval", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--train-tokens", type=int, default=0, help="training documents of this length (0: the long one)")
    ap.add_argument("--train-on-inputs", action="store_true", help="loss on every token, not only the answer")
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--worker", nargs=5)
    a = ap.parse_args()
    if a.worker:
        data, tokens, factor, rope, adapter = a.worker
        print("RESULT " + json.dumps(score_worker(data, int(tokens), float(factor), rope, adapter)))
        return
    long_ = int(a.factor * a.native)
    a.train_tokens = a.train_tokens or long_
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        docs = _records(long_, a.docs)
        train = (docs if a.train_tokens == long_ else _records(a.train_tokens, a.docs))[:-a.eval]
        train_file, held = _write(work / "train.jsonl", train), _write(work / "held.jsonl", docs[-a.eval:])
        native = _write(work / "native.jsonl", _records(a.native, a.docs)[-a.eval:])
        score = lambda f, n, k, ad, label: run_worker(__file__, ["--worker", f, str(n), str(k), a.rope, ad], label)
        ref = score(native, a.native, 1, "-", "native")
        before = score(held, long_, a.factor, "-", "before")
        run = _train(work, train_file, long_, a.factor, a)
        after = score(held, long_, a.factor, run["adapter"], "after")
    if not (ref and before and after):
        sys.exit("a scoring worker failed (above)")
    rows = [_row(f"base, native {a.native:,} positions, no scaling", ref),
            _row(f"base, {a.rope} RoPE ×{a.factor:g}, before fine-tuning", before),
            _row(f"after {a.steps} steps at {a.train_tokens:,} tokens (lr {a.lr:g}"
                 f"{', loss on every token' if a.train_on_inputs else ''})", after)]
    cols = ["model", "documents", "tokens", "retrieved", "digits_right_%", "answer_nll", "s_per_doc"]
    md = (f"Passkey retrieval, SmolLM2-135M QLoRA r={R}, held-out documents (bench/passkey.py, this CPU, one run; "
          f"fine-tune {run['seconds'] / 60:.1f} min, training losses {run['losses']}):\n\n" + table(rows, cols))
    publish("passkey", md, {"rows": rows, "train": {k: v for k, v in run.items() if k != "adapter"},
                            "factor": a.factor, "rope": a.rope, "steps": a.steps, "lr": a.lr, "eval": a.eval,
                            "train_tokens": a.train_tokens, "train_on_inputs": a.train_on_inputs}, a.readme)


if __name__ == "__main__":
    main()
