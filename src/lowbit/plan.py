"""Memory planner: will QLoRA fine-tuning of a model fit on a device? An itemised estimate.

Per item, for a LLaMA-style decoder (MoE: experts counted for weights, top-k for activations)::

    quantized weights   Σ linear numel · 4/8 bytes (NF3/NF2 are stored in 4-bit nibbles too)
    quant constants     DQ: numel/blocksize bytes + 4·⌈blocks/256⌉ + 4 per tensor;  no DQ: 4·numel/blocksize
    unquantized params  embeddings, output head (if untied), norms, router — compute dtype
    LoRA params / grads r·(in+out) per adapted layer, float32 each
    optimizer state     AdamW 8 B/param; 8-bit 2 B + 8/256; paged: one page pair on the device, the rest on the host
    activations         tokens · layers · (12h + 4·kv + 6·i·k + 2r·n_adapted + 4·heads) · dtype/2   (no checkpointing)
                        tokens · (2h·layers + one layer's activations)                            (checkpointing)
                        — coefficients counted from the tensors autograd saves in lowbit's own training step
    logits / loss       one loss chunk: ≈8M logits × 8 B (bf16 logits, their fp32 copy, the bf16 gradient)
    transient weight    the largest dequantized weight, forward and backward
    backward+allocator  activation gradients during backward and memory the allocator keeps after freeing;
                        on CPU measured here (≈0.75× activations, ≈9.5 layers with checkpointing), on GPU estimated
    framework overhead  CUDA context (GPU) or runtime buffers (CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .models import LowbitError

__all__ = ["Plan", "plan", "parse_size", "known_families", "main"]

GIB = 2**30
TRANSIENT_LOGITS = 1 << 23  # logits per loss chunk (train.loss_chunk_tokens)


def known_families() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lowbit").joinpath("families").iterdir() if p.name.endswith(".json"))


def load_model_config(model: str) -> dict:
    fam = resources.files("lowbit").joinpath("families", f"{model}.json")
    if fam.is_file():
        return json.loads(fam.read_text())
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise LowbitError(f"{p}: invalid JSON ({e})") from None
    raise LowbitError(f"unknown model {model!r}: not a folder or config.json, nor a known family "
                      f"({', '.join(known_families())})")


def parse_size(s: str | float | int) -> int:
    """'48GB' / '48GiB' / '80G' / '24000MB' / '1.5TB' → bytes (GB means GiB, as device vendors' tools show)."""
    if isinstance(s, (int, float)):
        if s <= 0:
            raise LowbitError(f"memory size must be positive, got {s}")
        return int(s * GIB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|B)?\s*", str(s), re.I)
    if not m:
        raise LowbitError(f"cannot read memory size {s!r} (use e.g. 48GB, 80GiB, 24000MB)")
    val = float(m.group(1))
    unit = (m.group(2) or "G").upper().rstrip("B").rstrip("I") or "B"
    mult = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    if val <= 0:
        raise LowbitError(f"memory size must be positive, got {s!r}")
    return int(val * mult)


@dataclass
class Plan:
    items: dict[str, int]
    host_bytes: int
    total_bytes: int
    device_bytes: int | None
    fits: bool | None
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"total_bytes": self.total_bytes, "fits": self.fits, "items": self.items, "host_bytes": self.host_bytes,
                "device_bytes": self.device_bytes, "settings": self.settings}

    def table(self) -> str:
        rows = [(k.replace("_", " "), v) for k, v in self.items.items()]
        w = max(len(k) for k, _ in rows) + 2
        out = [f"{k:<{w}}{_fmt(v):>12}" for k, v in rows]
        out.append("-" * (w + 12))
        out.append(f"{'total (device)':<{w}}{_fmt(self.total_bytes):>12}")
        if self.host_bytes:
            out.append(f"{'optimizer state on host':<{w}}{_fmt(self.host_bytes):>12}  (paged; not on the device)")
        if self.device_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"{verdict} in {_fmt(self.device_bytes)} ({100 * self.total_bytes / self.device_bytes:.0f}% used, "
                       f"{100 * HEADROOM:.0f}% headroom kept)")
        return "\n".join(out)


HEADROOM = 0.05


def _fmt(n: int) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _linears(cfg: dict) -> tuple[list[tuple[str, int, int, int]], dict]:
    """[(name, in, out, count)] of the decoder's linear layers, and shape facts."""
    h, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    d = cfg.get("head_dim") or h // nh
    i = cfg["intermediate_size"]
    experts = cfg.get("num_local_experts") or 1
    lin = [("q_proj", h, nh * d, L), ("k_proj", h, nkv * d, L), ("v_proj", h, nkv * d, L), ("o_proj", nh * d, h, L),
           ("gate_proj", h, i, L * experts), ("up_proj", h, i, L * experts), ("down_proj", i, h, L * experts)]
    facts = dict(h=h, L=L, nh=nh, kv=nkv * d, i=i, experts=experts, topk=cfg.get("num_experts_per_tok") or 1,
                 vocab=cfg["vocab_size"], tied=bool(cfg.get("tie_word_embeddings", False)))
    return lin, facts


def plan(model: str | dict, seq_len: int = 512, batch: int = 1, lora_r: int = 16, lora_targets="all-linear",
         quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64, optimizer: str = "adamw",
         gradient_checkpointing: bool = False, compute_dtype: str = "bfloat16", device_memory=None,
         device: str = "cuda", page_bytes: int = 0) -> Plan:
    for name, v in (("seq_len", seq_len), ("batch", batch), ("lora_r", lora_r), ("blocksize", blocksize)):
        if not isinstance(v, int) or v <= 0:
            raise LowbitError(f"{name} must be a positive integer, got {v!r}")
    if quant_type not in ("nf4", "fp4", "int4", "nf3", "nf2", "none"):
        raise LowbitError(f"quant_type must be nf4, fp4, int4, nf3, nf2 or none, got {quant_type!r}")
    if optimizer not in ("adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"):
        raise LowbitError(f"unknown optimizer {optimizer!r}")
    cfg = load_model_config(model) if isinstance(model, str) else model
    try:
        lin, f = _linears(cfg)
    except KeyError as e:
        raise LowbitError(f"model config lacks {e.args[0]!r}") from None
    dbytes = {"bfloat16": 2, "float16": 2, "float32": 4}[compute_dtype]
    if lora_targets == "all-linear":
        targets = {n for n, *_ in lin}
    elif lora_targets in ("attn", "attention"):
        targets = {"q_proj", "k_proj", "v_proj", "o_proj"}
    else:
        targets = set(lora_targets.split(",")) if isinstance(lora_targets, str) else set(lora_targets)
        unknown = targets - {n for n, *_ in lin}
        if unknown:
            raise LowbitError(f"unknown LoRA targets {sorted(unknown)}; known: {', '.join(n for n, *_ in lin)}")
    items: dict[str, int] = {}
    qnumel = sum(a * b * c for _, a, b, c in lin)
    ntensors = sum(c for *_, c in lin)
    if quant_type == "none":
        items["quantized_weights"] = 0
        items["quant_constants"] = 0
        linear16 = qnumel * dbytes
    else:
        items["quantized_weights"] = qnumel // 2
        blocks = sum(c * math.ceil(a * b / blocksize) for _, a, b, c in lin)
        if double_quant:
            nested = sum(c * math.ceil(math.ceil(a * b / blocksize) / 256) for _, a, b, c in lin)
            items["quant_constants"] = blocks + 4 * nested + 4 * ntensors
        else:
            items["quant_constants"] = 4 * blocks
        linear16 = 0
    h, L, V = f["h"], f["L"], f["vocab"]
    other = V * h * (1 if f["tied"] else 2) + (2 * L + 1) * h + (h * f["experts"] * L if f["experts"] > 1 else 0)
    items["unquantized_params"] = other * dbytes + linear16
    for n, a, b, _ in lin:
        if n in targets and lora_r > min(a, b):
            raise LowbitError(f"lora_r={lora_r} is larger than {n} ({b}x{a})")
    lora = sum(lora_r * (a + b) * c for n, a, b, c in lin if n in targets)
    n_adapted = sum(1 for n, *_ in lin if n in targets)
    items["lora_params"] = 4 * lora
    items["gradients"] = 4 * lora
    per_param = {"adamw": 8, "paged_adamw": 8, "adamw_8bit": 2 + 8 / 256, "paged_adamw_8bit": 2 + 8 / 256}[optimizer]
    state = int(lora * per_param)
    host = 0
    if optimizer.startswith("paged"):
        page = page_bytes or int(2 * (1 << 20) * (8 if "8bit" not in optimizer else 2))
        items["optimizer_state"] = min(state, page)
        host = state - items["optimizer_state"]
    else:
        items["optimizer_state"] = state
    tokens = seq_len * batch
    per_layer_tok = (12 * h + 4 * f["kv"] + 6 * f["i"] * f["topk"] + 2 * lora_r * n_adapted + 4 * f["nh"] + 8) * dbytes / 2
    if gradient_checkpointing:
        act = tokens * (2 * h * L * dbytes / 2 + per_layer_tok)
    else:
        act = tokens * L * per_layer_tok
    items["activations"] = int(act + tokens * (2 * h + 8) * dbytes / 2)
    chunk = min(tokens, max(64, TRANSIENT_LOGITS // V))
    items["logits_and_loss"] = chunk * V * 8 + tokens * h * 4  # fused chunked loss: bf16 + fp32 logits, bf16 grad
    biggest = max(a * b for _, a, b, _ in lin)
    items["transient_weight"] = 2 * biggest * dbytes if quant_type != "none" else 0
    layer_act = tokens * per_layer_tok
    if device == "cuda":
        # CUDA context + caching-allocator slack; backward transients (activation gradients). Not yet measured
        # on a GPU here: an estimate.
        back = 2 * layer_act if gradient_checkpointing else 0.5 * act
        items["backward_and_allocator"] = int(back + 0.05 * sum(items.values()))
        items["framework_overhead"] = int(0.75 * GIB)
    else:
        # Measured on this CPU (bench/plan_validate.py): activation gradients in backward plus what glibc keeps
        # after freeing come to ≈0.75× the saved activations without checkpointing, ≈9.5 layers' activations
        # with it (recomputed layers leave freed pages behind), plus ~32 MiB of runtime buffers.
        items["backward_and_allocator"] = int(9.5 * layer_act if gradient_checkpointing else 0.75 * act)
        items["framework_overhead"] = 32 << 20
    total = sum(items.values())
    dev = parse_size(device_memory) if device_memory is not None else None
    fits = None if dev is None else total <= (1 - HEADROOM) * dev
    settings = dict(seq_len=seq_len, batch=batch, lora_r=lora_r, lora_targets=lora_targets, quant_type=quant_type,
                    double_quant=double_quant, blocksize=blocksize, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, compute_dtype=compute_dtype, device=device,
                    quantized_params=qnumel, lora_params=lora)
    return Plan(items, host, total, dev, fits, settings)


def largest(model, what: str, device_memory, **kw) -> int:
    """The largest ``seq_len`` or ``batch`` that fits (0 if even 1 does not)."""
    lo, hi = 0, 1
    while plan(model, **{**kw, what: hi}, device_memory=device_memory).fits:
        lo, hi = hi, hi * 2
        if hi > 1 << 24:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan(model, **{**kw, what: mid}, device_memory=device_memory).fits:
            lo = mid
        else:
            hi = mid
    return lo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit plan", description="Will QLoRA fine-tuning of MODEL fit? Itemised memory plan.",
                                 epilog=f"known families: {', '.join(known_families())}")
    ap.add_argument("model", help="model folder, config.json, or a known family name")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="micro-batch size")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-targets", default="all-linear", help="all-linear, attn, or names: q_proj,v_proj")
    ap.add_argument("--quant-type", default="nf4", help="nf4, fp4, int4, nf3, nf2, or none (16-bit LoRA)")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--blocksize", type=int, default=64)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--gpu-memory", help="device memory, e.g. 48GB")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--max-seq-len", action="store_true", help="print the largest sequence length that fits")
    ap.add_argument("--max-batch", action="store_true", help="print the largest micro-batch that fits")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    kw = dict(seq_len=a.seq_len, batch=a.batch, lora_r=a.lora_r, lora_targets=a.lora_targets, quant_type=a.quant_type,
              double_quant=not a.no_double_quant, blocksize=a.blocksize, optimizer=a.optimizer,
              gradient_checkpointing=a.gradient_checkpointing, compute_dtype=a.compute_dtype, device=a.device)
    p = plan(a.model, device_memory=a.gpu_memory, **kw)
    out = p.to_json()
    if (a.max_seq_len or a.max_batch) and a.gpu_memory is None:
        raise LowbitError("--max-seq-len / --max-batch need --gpu-memory")
    if a.max_seq_len:
        out["max_seq_len"] = largest(a.model, "seq_len", a.gpu_memory, **kw)
    if a.max_batch:
        out["max_batch"] = largest(a.model, "batch", a.gpu_memory, **kw)
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{a.model}: seq {a.seq_len} x batch {a.batch}, {a.quant_type}{'+DQ' if not a.no_double_quant and a.quant_type != 'none' else ''}, "
              f"LoRA r={a.lora_r} ({a.lora_targets}), {a.optimizer}, checkpointing {'on' if a.gradient_checkpointing else 'off'}, "
              f"{a.compute_dtype} on {a.device}\n")
        print(p.table())
        for k in ("max_seq_len", "max_batch"):
            if k in out:
                print(f"{k.replace('_', ' ')} that fits: {out[k]}")
    return 0
