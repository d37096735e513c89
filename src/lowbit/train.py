"""The training loop: QLoRA fine-tuning with gradient accumulation, checkpoints and exact resume.

    for step in 1..total:
        for each of gradient_accumulation_steps micro-batches:
            loss = Σ token losses / tokens in the whole accumulated batch   (bf16 autocast where native)
            loss.backward()
        clip grads; optimizer.step(); scheduler.step()
        every eval_steps: held-out loss; every save_steps: atomic checkpoint

A checkpoint holds the adapter (PEFT files), optimizer state, the step, the data position and the RNG
state, so ``--resume`` continues with the same losses an uninterrupted run would have had.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from . import models
from .config import TrainConfig, config_to_yaml
from .data import Batches, load_splits, tokenize_records
from .models import LowbitError
from .nn.lora import add_lora, count_parameters

__all__ = ["train", "evaluate", "prepare", "lm_loss"]


# ---- loss ----------------------------------------------------------------------------------------

def _split_head(model):
    """(body, head) when the model is body → lm_head, so the loss can be computed in chunks."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):  # e.g. a peft wrapper: use its own forward
        return None, None
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings()
    if not isinstance(body, PreTrainedModel) or body is model or head is None or getattr(model.config, "final_logit_softcapping", None):
        return None, None
    return body, head


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Σᵢ CE(hᵢ·Wᵀ, yᵢ) for a frozen head W, a chunk of rows at a time; logits never exist in full.

    forward:  per chunk z = h·Wᵀ (compute dtype), lse = logsumexp(z) in float32, loss += Σ (lse − z[y]);
              keeps only lse (4 bytes a token)
    backward: per chunk recompute z, ∂/∂z = softmax(z) − onehot(y) = exp(z − lse) − onehot(y), ∂/∂h = (∂/∂z)·W
    """

    @staticmethod
    def forward(ctx, h, weight, labels, chunk: int):
        w = weight.to(h.dtype)
        lse = torch.empty(h.shape[0], dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], chunk):
            z = (h[i : i + chunk] @ w.t()).float()
            lse[i : i + chunk] = torch.logsumexp(z, dim=-1)
            total += lse[i : i + chunk].sum() - z.gather(1, labels[i : i + chunk, None]).sum()
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.chunk = chunk
        return total

    @staticmethod
    def backward(ctx, g):
        h, weight, labels, lse = ctx.saved_tensors
        w = weight.to(h.dtype)
        gh = torch.empty_like(h)
        for i in range(0, h.shape[0], ctx.chunk):
            z = (h[i : i + ctx.chunk] @ w.t()).float()
            p = torch.exp_(z.sub_(lse[i : i + ctx.chunk, None]))
            p[torch.arange(p.shape[0]), labels[i : i + ctx.chunk]] -= 1
            gh[i : i + ctx.chunk] = (p.mul_(g)).to(h.dtype) @ w
        return gh, None, None, None


def loss_chunk_tokens(vocab: int) -> int:
    """Tokens per loss chunk: about 8M logits at a time (≈ 120 MB of transient float32 work)."""
    return max(64, (1 << 23) // max(vocab, 1))


def lm_loss(model, batch, chunk_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses, number of learned tokens). The logits are never materialised for the
    whole batch: the head and the loss run over chunks of tokens, recomputed in backward."""
    labels = batch["labels"][:, 1:].reshape(-1)
    n = int((labels != -100).sum())
    body, head = _split_head(model)
    if body is None:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float()
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), n
    chunk_tokens = chunk_tokens or loss_chunk_tokens(head.weight.shape[0])
    h = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    h = h[:, :-1].reshape(-1, h.shape[-1])
    keep = labels != -100
    h, labels = h[keep], labels[keep]
    if head.weight.requires_grad:  # a trainable head needs its weight gradient: the plain path
        logits = F.linear(h, head.weight.to(h.dtype)).float()
        return F.cross_entropy(logits, labels, reduction="sum"), n
    return _ChunkedCrossEntropy.apply(h, head.weight, labels, chunk_tokens), n


def _autocast(dtype):
    return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model, batches: Batches, dtype, max_batches: int | None = None) -> float:
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for k, idx in enumerate([list(range(i, min(i + batches.mb, len(batches.samples)))) for i in range(0, len(batches.samples), batches.mb)]):
        if max_batches is not None and k >= max_batches:
            break
        with _autocast(dtype):
            s, c = lm_loss(model, batches.batch(idx))
        tot, n = tot + float(s), n + c
    model.train(was)
    return tot / max(n, 1)


# ---- setup ---------------------------------------------------------------------------------------

def resolve_dtype(name: str) -> torch.dtype:
    return models.default_compute_dtype() if name == "auto" else getattr(torch, name)


def prepare(cfg: TrainConfig, log=print):
    """Model with adapters, tokenizer, and tokenized train/valid data."""
    torch.manual_seed(cfg.seed)
    dtype = resolve_dtype(cfg.compute_dtype)
    tok = models.load_tokenizer(cfg.base_model)
    sources = cfg.datasets if isinstance(cfg.datasets, list) else [cfg.datasets]
    train_recs, val_recs = [], []
    for src in sources:
        tr, va = load_splits(src, cfg.val_set_size, cfg.seed)
        train_recs += tr
        val_recs += va
    train = tokenize_records(train_recs, tok, cfg.dataset_format, cfg.sequence_len, cfg.train_on_inputs)
    valid = tokenize_records(val_recs, tok, cfg.dataset_format, cfg.sequence_len, cfg.train_on_inputs) if val_recs else None
    log(f"data: {len(train.samples)} train / {len(valid.samples) if valid else 0} valid samples ({train.fmt}); "
        f"{train.truncated} truncated to {cfg.sequence_len} tokens, {train.dropped} dropped (nothing to learn)")
    if cfg.sample_packing:
        log("sample_packing: packing without cross-sample attention needs a block-diagonal mask this attention "
            "implementation does not take; using length-grouped batches instead")
    model = models.load(cfg.base_model, quantize_weights=cfg.load_in_4bit, quant_type=cfg.quant_type,
                        blocksize=cfg.blocksize, double_quant=cfg.double_quant, compute_dtype=dtype,
                        trust_remote_code=cfg.trust_remote_code, keep_source=cfg.lora_init == "loftq")
    target = cfg.lora_target_modules
    add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=target,
             use_rslora=cfg.use_rslora, init=cfg.lora_init, verbose=False)
    trainable, total = count_parameters(model)
    log(f"model: {cfg.base_model} ({'4-bit ' + cfg.quant_type if cfg.load_in_4bit else 'unquantized'}, compute "
        f"{str(dtype).split('.')[-1]}); LoRA r={cfg.lora_r}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tok, train, valid, dtype


def make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, foreach=True)
    from . import optim  # 8-bit and paged AdamW

    return optim.make(cfg.optimizer, params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                      budget_bytes=int(cfg.optimizer_budget_mb * 2**20))


def make_schedule(cfg: TrainConfig, total: int):
    def f(step):
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return max(0.0, 1 - frac) if cfg.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return f


# ---- checkpoints ---------------------------------------------------------------------------------

def _save_checkpoint(out: Path, model, opt, state: dict, limit: int) -> Path:
    from safetensors.torch import save_file

    ckdir = out / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step-{state['step']:07d}"
    tmp = Path(tempfile.mkdtemp(dir=ckdir, prefix=".tmp-"))
    try:
        models.save_adapter(model, tmp)
        flat = {"rng": torch.get_rng_state()}
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                flat[f"state.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp / "trainer_state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({**state, "param_groups": sd["param_groups"]}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(ckdir.glob("step-*"))[:-limit] if limit > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_checkpoint(out: Path) -> Path | None:
    cks = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    return cks[-1] if cks else None


def _load_checkpoint(ck: Path, model, opt) -> dict:
    from safetensors.torch import load_file

    from .models import read_adapter, set_adapter_weights

    set_adapter_weights(model, read_adapter(ck)[1], ck)
    state = json.loads((ck / "trainer_state.json").read_text())
    flat = load_file(str(ck / "trainer_state.safetensors"))
    sd = {"state": {}, "param_groups": state.pop("param_groups")}
    for k, v in flat.items():
        if k.startswith("state."):
            _, pid, name = k.split(".", 2)
            sd["state"].setdefault(int(pid), {})[name] = v
    opt.load_state_dict(sd)
    torch.set_rng_state(flat["rng"])
    return state


# ---- the loop ------------------------------------------------------------------------------------

def _check_output_dir(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool):
    if not out.exists() or not any(out.iterdir()):
        return
    saved = out / "config.yaml"
    if resume:
        if _latest_checkpoint(out) is None:
            raise LowbitError(f"{out}: --resume, but there is no checkpoint in {out / 'checkpoints'}")
        return
    if overwrite:
        for name in ("checkpoints", "metrics.jsonl", "loss.png", "adapter_model.safetensors", "adapter_config.json", "config.yaml", "tensorboard"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return
    what = "a different run" if saved.exists() and saved.read_text() != config_to_yaml(cfg) else "a run"
    raise LowbitError(f"{out}: output_dir already holds {what}; use --resume to continue it or --overwrite to replace it")


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, progress: bool = True, log=print) -> dict:
    cfg.validate()
    out = Path(cfg.output_dir)
    _check_output_dir(out, cfg, resume, overwrite)
    model, tok, train_data, valid_data, dtype = prepare(cfg, log)
    batches = Batches(train_data.samples, cfg.micro_batch_size, tok.pad_token_id, cfg.seed)
    valid = Batches(valid_data.samples, cfg.micro_batch_size, tok.pad_token_id, cfg.seed) if valid_data else None
    per_epoch = math.ceil(len(batches) / cfg.gradient_accumulation_steps)
    total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.num_epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(cfg, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_schedule(cfg, total))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_to_yaml(cfg))

    step, epoch, pos, history = 0, 0, 0, {"eval": []}
    if resume:
        ck = _latest_checkpoint(out)
        st = _load_checkpoint(ck, model, opt)
        step, epoch, pos, history = st["step"], st["epoch"], st["pos"], st["history"]
        sched.last_epoch = step  # the optimizer's saved param groups already carry this step's lr
        log(f"resumed from {ck} at step {step}")
    else:
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if "base_eval_loss" not in history and valid is not None:
        history["base_eval_loss"] = evaluate(model, valid, dtype)
        log(f"eval loss before training: {history['base_eval_loss']:.4f}")

    tb = _tensorboard(out) if cfg.tensorboard else None
    metrics = open(out / "metrics.jsonl", "a")
    order = batches.order(epoch)
    model.train()
    bar = _bar(total, step, progress)
    last_ck, interrupted = None, False
    prev_handler = signal.getsignal(signal.SIGINT)
    t_start, tokens_seen = time.perf_counter(), 0

    def state():
        return {"step": step, "epoch": epoch, "pos": pos, "history": history, "config": asdict(cfg)}

    at_start = (epoch, pos, torch.get_rng_state())  # what a Ctrl-C mid-step rolls back to
    try:
        while step < total:
            group = []
            for _ in range(cfg.gradient_accumulation_steps):
                if pos >= len(order):
                    epoch, pos = epoch + 1, 0
                    order = batches.order(epoch)
                group.append(batches.batch(order[pos]))
                pos += 1
            n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in group)
            loss_sum = 0.0
            for b in group:
                with _autocast(dtype):
                    s, _ = lm_loss(model, b)
                (s / n_tok).backward()
                loss_sum += s.detach().item()
            loss = loss_sum / n_tok
            if not math.isfinite(loss):
                ck = _latest_checkpoint(out)
                raise LowbitError(f"step {step + 1}: loss is {loss}; stopped. Last good checkpoint: {ck or 'none'} "
                                  "(try a lower learning_rate)")
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            step += 1
            at_start = (epoch, pos, torch.get_rng_state())
            tokens_seen += int(sum(int(b["attention_mask"].sum()) for b in group))
            elapsed = time.perf_counter() - t_start
            rec = {"step": step, "epoch": epoch + pos / len(order), "loss": loss, "lr": lr,
                   "grad_norm": float(gnorm) if gnorm is not None else None, "tokens_per_s": tokens_seen / elapsed,
                   "time_s": elapsed}
            if valid is not None and (step % cfg.eval_steps == 0 or step == total):
                rec["eval_loss"] = evaluate(model, valid, dtype)
                history["eval"].append([step, rec["eval_loss"]])
            if step % cfg.logging_steps == 0 or "eval_loss" in rec:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                if tb:
                    for k in ("loss", "lr", "eval_loss", "tokens_per_s"):
                        if rec.get(k) is not None:
                            tb.add_scalar(k, rec[k], step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                            **({"eval": f"{rec['eval_loss']:.3f}"} if "eval_loss" in rec else {}))
            if step % cfg.save_steps == 0 or step == total:
                last_ck = _save_checkpoint(out, model, opt, state(), cfg.save_total_limit)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        metrics.close()
        signal.signal(signal.SIGINT, prev_handler)
        if tb:
            tb.close()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not tear the checkpoint
        try:
            opt.zero_grad(set_to_none=True)  # drop the half-accumulated step
            epoch, pos, rng = at_start
            torch.set_rng_state(rng)
            last_ck = _save_checkpoint(out, model, opt, state(), cfg.save_total_limit) if step else None
        finally:
            signal.signal(signal.SIGINT, prev_handler)
        raise LowbitError(f"interrupted at step {step}; checkpoint saved to {last_ck}. Continue with --resume") from None

    models.save_adapter(model, out)
    plot_losses(out, history.get("base_eval_loss"))
    result = {"output_dir": str(out), "steps": step, "base_eval_loss": history.get("base_eval_loss"),
              "eval_loss": history["eval"][-1][1] if history["eval"] else None,
              "tokens_per_s": tokens_seen / max(time.perf_counter() - t_start, 1e-9), "model": model, "tokenizer": tok}
    return result


def _bar(total, start, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard: not installed (pip install tensorboard); skipping")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def plot_losses(out: Path, base_eval_loss: float | None = None) -> Path | None:
    """Write loss.png from metrics.jsonl: train loss per step (and its moving average), eval loss points
    starting from the model before training (step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = [r["step"] for r in recs], [r["loss"] for r in recs]
    ax.plot(steps, losses, label="train", lw=0.8, alpha=0.4)
    avg, smooth = losses[0], []
    for x in losses:
        avg = 0.9 * avg + 0.1 * x
        smooth.append(avg)
    ax.plot(steps, smooth, label="train (moving average)", lw=1.5)
    ev = ([(0, base_eval_loss)] if base_eval_loss is not None else []) + \
        [(r["step"], r["eval_loss"]) for r in recs if r.get("eval_loss") is not None]
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "loss.png")
    return out / "loss.png"
