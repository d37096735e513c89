"""Memory planner: will QLoRA fine-tuning of a model fit on a device? An itemised estimate.

Per item, for a decoder whose linear layers ``shapes.py`` reads (MoE: all experts counted for weights, top-k for
activations)::

    quantized weights   Σ packed bytes of each linear (quant.spec: NF4 4 bits, NF3 3, NF2 2; int8 8 + a float32 a row)
    quant constants     DQ: numel/blocksize bytes + 4·⌈blocks/256⌉ + 4 per tensor;  no DQ: 4·numel/blocksize
    unquantized params  embeddings, output head (if untied), norms, biases, routers — compute dtype
    LoRA params / grads r·(in+out) per adapted layer, float32 each
    block scales        ``train_quant_scales``: one float32 value per block of every 4-bit linear and its gradient
                        (their optimizer state counted with LoRA's); backward holds the largest layer's weight
                        gradient and its product with the weight (compute dtype each) in the transient weight
    trained whole       lora_modules_to_save's embeddings / head: float32 weights, gradients and optimizer state
    optimizer state     AdamW 8 B/param; 8-bit 2 B + 8/256; paged: one page pair on the device, the rest on the host
    activations         tokens · layers · (12h + 4·kv + m·i + 2r·n_adapted + 4·heads) · dtype/2   (no checkpointing)
                        — m = 4 for a dense MLP (the gate and up outputs: the down projection's input is recomputed,
                        nn/fused.py), 6 for mixture-of-experts blocks (the routed experts' down inputs are kept)
                        — ``tiled_mlp``: m·i/shards + 2h instead of m·i (one shard's intermediates at a time)
                        tokens · (2h·layers + one layer's activations)                            (checkpointing)
                        — with ``gradient_checkpointing: offload`` on a GPU the 2h·layers checkpoints wait on the host,
                        with ``offload_disk`` (any device) in files: counted on neither
                        — coefficients counted from the tensors autograd saves in lowbit's own training step; i and
                        n_adapted per token (MoE: the top-k experts' widths and adapters)
    logits / loss       one loss chunk (nn.loss_chunk): ≈8M logits × 8 B (bf16 logits, fp32 copy, bf16 gradient)
    generation          rl: grpo — rows are prompt (≤ sequence_len) + completion (≤ max_completion_length); the
                        step's sampling holds a KV cache of 2·kv per token and layer for each generated row, and
                        three float32 logit rows per row (logits, filtered, noise); sampling runs between steps,
                        so only what it needs beyond the training step's activations is counted
    transient weight    the largest dequantized weight, forward and backward
    backward+allocator  activation gradients during backward and memory the allocator keeps after freeing;
                        on CPU measured here (``host_backward.py``: without checkpointing a fraction of the
                        activations; with it a floor at short lengths, then ≈2 layers' activations, under one layer's
                        from 32 MiB hidden states); on a GPU with checkpointing simulated on fake tensors
                        (``device_backward.py``), without it estimated (half the activations); + 5 % allocator slack
    data pipeline       CPU: the tokenizer, the datasets/Arrow runtime and the token tables (≈150 MiB, measured)
    framework overhead  CUDA context (GPU) or runtime buffers (CPU)

Several ranks (``world_size``, ``distributed``), per rank:

    ddp    everything as one process, plus gradient buckets (one more copy of the LoRA gradients)
    fsdp   base, LoRA, gradients and optimizer state / N, plus what is all-gathered at once: two decoder layers
           (the one computing and the one prefetched) and the root's parameters (embeddings, head, final norm),
           which stay gathered for the whole step; activations as one process (each rank has its own micro-batch)

Settings are spelled as the training config spells them (``sequence_len``, ``micro_batch_size``,
``lora_target_modules``, ``load_in_4bit``, …), so ``plan_config(cfg)`` plans exactly the run ``train(cfg)`` does.
Imports no torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..dtypes import DTYPES, canonical, default_compute_dtype_name
from ..errors import LowbitError
from ..nn.lora_options import ALL_LINEAR, ALL_LINEAR_EXPERTS, PEFT_REFUSED, target_names
from ..nn.loss_chunk import loss_chunk_tokens
from ..nn.mlp_shards import shard_count, tiles
from ..optim.registry import check_optimizer
from ..quant.spec import INT8, NESTED_BLOCKSIZE, QUANT_TYPES, check_blocksize, check_quant_type, packed_bytes
from ..sizes import GIB, parse_size
from ..training.config import DISTRIBUTED
from ..training.grpo_spec import grpo_spec_from
from ..training.preference_spec import PAIRED
from .catalog import load_model_config
from .device_backward import device_backward_bytes
from .host_backward import host_backward_bytes
from .shapes import Layer, Shapes, shapes
from .vision import is_vision, layer_prefix, text_config, vision_params

__all__ = ["Plan", "plan", "plan_config", "config_settings", "largest", "parse_size", "PLAN_KEYS", "GIB"]

HEADROOM = 0.05
# Measured on a 2-core AVX2 CPU (bench/plan_validate.py, whole lowbit.train runs of SmolLM2-135M): the tokenizer, the
# `datasets` / Arrow runtime and the token tables of a training run take ≈150 MiB of host memory beside the model;
# in float32 compute the saved activations (and what backward frees after them) come to 1.10× the coefficients
# counted for bf16 (float32 copies that autocast keeps in bf16 runs)
DATA_PIPELINE_CPU = 150 << 20
FP32_CPU_ACTIVATIONS = 1.10
# the training config keys a plan depends on
PLAN_KEYS = ("sequence_len", "micro_batch_size", "lora_r", "lora_target_modules", "load_in_4bit", "load_in_8bit",
             "lora_modules_to_save", "quant_type", "double_quant", "blocksize", "optimizer", "gradient_checkpointing",
             "compute_dtype", "distributed", "tiled_mlp", "tiled_mlp_num_shards", "train_quant_scales")


@dataclass
class Plan:
    items: dict[str, int]
    host_bytes: int
    total_bytes: int
    device_bytes: int | None
    fits: bool | None
    settings: dict = field(default_factory=dict)
    host_items: dict[str, int] = field(default_factory=dict)  # what host_bytes is made of

    def to_json(self) -> dict:
        return {"total_bytes": self.total_bytes, "fits": self.fits, "items": self.items, "host_bytes": self.host_bytes,
                "host_items": self.host_items, "device_bytes": self.device_bytes, "settings": self.settings}

    def table(self) -> str:
        rows = [(k.replace("_", " "), v) for k, v in self.items.items()]
        w = max(len(k) for k, _ in rows) + 2
        out = [f"{k:<{w}}{_fmt(v):>12}" for k, v in rows]
        out.append("-" * (w + 12))
        out.append(f"{'total (device)':<{w}}{_fmt(self.total_bytes):>12}")
        for k, v in self.host_items.items():
            why = "paged" if k == "optimizer_state" else "gradient_checkpointing: offload"
            out.append(f"{k.replace('_', ' ') + ' on host':<{w}}{_fmt(v):>12}  ({why}; not on the device)")
        if self.settings.get("disk_bytes"):
            out.append(f"{'checkpoints on disk':<{w}}{_fmt(self.settings['disk_bytes']):>12}  "
                       "(gradient_checkpointing: offload_disk; files under TMPDIR)")
        if self.device_bytes:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"{verdict} in {_fmt(self.device_bytes)} ({100 * self.total_bytes / self.device_bytes:.0f}% "
                       f"used, {100 * HEADROOM:.0f}% headroom kept)")
        return "\n".join(out)


def _fmt(n: int) -> str:
    for unit, div in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


def _targets(lora_target_modules, layers: list[Layer], r: int, model_type: str = "") -> set[str]:
    """The paths of the adapted layers, from the same spellings training takes (``nn.lora_options``):
    ``all-linear`` (experts aside), ``all-linear+experts`` (both: but layers narrower than ``r``), names, or a
    regex over module paths like ``model.layers.0.self_attn.q_proj`` or ``model.layers.0.mlp.experts.0.down_proj``."""
    if lora_target_modules in (ALL_LINEAR, ALL_LINEAR_EXPERTS):
        refused = PEFT_REFUSED[1] if model_type in PEFT_REFUSED[0] else ()
        chosen = [x for x in layers if (lora_target_modules == ALL_LINEAR_EXPERTS or not x.expert)
                  and x.name not in refused]
        fit = {x.path for x in chosen if min(x.fan_in, x.fan_out) >= r}
        if chosen and not fit:
            widest = max(min(x.fan_in, x.fan_out) for x in chosen)
            raise LowbitError(f"lora_r={r} is larger than every linear layer (the widest allows r ≤ {widest})")
        return fit
    wanted = target_names(lora_target_modules)
    if wanted is None:
        try:
            chosen = {x.path for x in layers if re.fullmatch(lora_target_modules, x.path)}
        except re.error as e:
            raise LowbitError(f"lora_target_modules: invalid regex {lora_target_modules!r} ({e})") from None
        if not chosen:
            raise LowbitError(f"lora_target_modules: regex {lora_target_modules!r} matches no linear layer")
        return chosen
    names = sorted({x.name for x in layers})
    unknown = [t for t in wanted if t.split(".")[-1] not in names]
    if unknown:
        raise LowbitError(f"lora_target_modules: unknown {unknown}; known: {', '.join(names)}")
    return {x.path for x in layers if x.name in {t.split(".")[-1] for t in wanted}}


def _layers(model: str | dict, lora_target_modules, lora_r: int) -> tuple[Shapes, list[tuple], set[str], str]:
    """(shapes, [(path, in, out, count)], the adapted paths, the model type) of ``model`` (a name, folder or
    config dict)."""
    cfg = load_model_config(model) if isinstance(model, str) else model
    try:
        if is_vision(cfg):  # the language model as a text model; the vision side float (planner/vision.py)
            text, prefix = text_config(cfg), layer_prefix(cfg)
            f = shapes(text)
            f = dataclasses.replace(f, other_params=f.other_params + vision_params(model, cfg), layers=[
                dataclasses.replace(x, path=x.path.replace("model.", prefix, 1)) for x in f.layers])
            cfg = {**text, "model_type": cfg.get("model_type")}
        else:
            f = shapes(cfg)
    except KeyError as e:
        raise LowbitError(f"model config lacks {e.args[0]!r}") from None
    targets = _targets(lora_target_modules, f.layers, lora_r, cfg.get("model_type", ""))
    for x in f.layers:
        if x.path in targets and lora_r > min(x.fan_in, x.fan_out):
            raise LowbitError(f"lora_r={lora_r} is larger than {x.name} ({x.fan_out}x{x.fan_in})")
    return f, [(x.path, x.fan_in, x.fan_out, x.count) for x in f.layers], targets, cfg.get("model_type")


def plan(model: str | dict, *, sequence_len: int = 512, micro_batch_size: int = 1, lora_r: int = 16,
         lora_target_modules=ALL_LINEAR, load_in_4bit: bool = True, quant_type: str = "nf4", double_quant: bool = True,
         blocksize: int = 64, optimizer: str = "adamw", gradient_checkpointing: bool = False,
         compute_dtype: str = "bfloat16", device_memory=None, device: str = "cuda", page_bytes: int = 0,
         world_size: int = 1, distributed: str = "auto", load_in_8bit: bool = False, lora_modules_to_save=None,
         rows_per_sample: int = 1, completion_len: int = 0, generation_rows: int = 0, tiled_mlp=False,
         tiled_mlp_num_shards: int = 0, train_quant_scales: bool = False) -> Plan:
    """The itemised peak memory of QLoRA training on one device (of ``world_size``; see the module docstring).
    ``rows_per_sample``: 2 for preference pairs (chosen and rejected take a row each; the reference pass keeps
    no activations). ``completion_len``, ``generation_rows``: a GRPO run's completion length and the rows a rank
    samples each step."""
    kind, dtype = _checked(sequence_len, micro_batch_size, lora_r, load_in_4bit, quant_type, blocksize, optimizer,
                           compute_dtype, device)
    f, lin, targets, cfg_type = _layers(model, lora_target_modules, lora_r)
    dbytes = DTYPES[dtype]
    stored = INT8 if load_in_8bit else quant_type if load_in_4bit else None
    items = _weights(lin, f, dbytes, stored, double_quant, blocksize)
    scales = _blocks(lin, blocksize) if train_quant_scales and load_in_4bit else 0
    lora, host = _trained(items, lin, targets, lora_r, kind, page_bytes, scales)
    tokens = (sequence_len + completion_len) * micro_batch_size * rows_per_sample
    per_layer_tok, shards = _layer_bytes_per_token(f, targets, lora_r, dbytes, sequence_len + completion_len,
                                                   tiled_mlp, tiled_mlp_num_shards)
    per_layer_tok *= FP32_CPU_ACTIVATIONS if device == "cpu" and dtype == "float32" else 1.0
    checkpoints = tokens * 2 * f.h * f.L * dbytes / 2  # the decoder layers' inputs, kept for the recompute
    offloaded = gradient_checkpointing == "offload" and device == "cuda"
    kept = 0 if offloaded or gradient_checkpointing == "offload_disk" else checkpoints  # on the device
    act = tokens * per_layer_tok + kept if gradient_checkpointing else tokens * f.L * per_layer_tok
    items["activations"] = int(act + tokens * (2 * f.h + 8) * dbytes / 2)
    chunk = min(tokens, loss_chunk_tokens(f.vocab))
    items["logits_and_loss"] = chunk * f.vocab * 8 + tokens * f.h * 4  # chunked loss: bf16 + fp32 logits, grad
    items["transient_weight"] = (2 + 2 * bool(scales)) * max(a * b for _, a, b, _ in lin) * dbytes if stored else 0
    whole = _trained_whole(lora_modules_to_save, f)
    if whole:  # float32 copies with their gradients and optimizer state (replacing their compute-dtype bytes)
        items["trained_full_precision"] = int(whole * (8 + kind.state_bytes_per_param) - whole * dbytes)
    mode = _mode(distributed, world_size)
    if mode == "fsdp":
        _shard(items, world_size, f.L, lora_layer=4 * lora / f.L)
        host = -(-host // world_size)
    elif mode == "ddp":
        items["ddp_gradient_buckets"] = items["gradients"]
    host_items = {k: int(v) for k, v in (("optimizer_state", host), ("checkpoints", checkpoints * offloaded)) if v}
    items.update(_overheads(items, act, tokens * per_layer_tok, tokens * f.L * per_layer_tok,
                            gradient_checkpointing, device, hidden_bytes=tokens * f.h * dbytes,
                            device_back=device_backward_bytes(tokens, f.h, f.mlp_per_token, shards)))
    if generation_rows:
        items["generation_kv_cache"] = _generation(items, f, generation_rows, sequence_len + completion_len, dbytes)
    total = sum(items.values())
    dev = parse_size(device_memory) if device_memory is not None else None
    fits = None if dev is None else total <= (1 - HEADROOM) * dev
    settings = dict(sequence_len=sequence_len, micro_batch_size=micro_batch_size, lora_r=lora_r,
                    lora_target_modules=lora_target_modules, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                    quant_type=quant_type, double_quant=double_quant, blocksize=blocksize, optimizer=optimizer,
                    gradient_checkpointing=gradient_checkpointing, compute_dtype=dtype, device=device,
                    world_size=world_size, distributed=mode, model_type=cfg_type, rows_per_sample=rows_per_sample,
                    completion_len=completion_len, generation_rows=generation_rows, lora_params=lora,
                    tiled_mlp=tiled_mlp, mlp_shards=shards, quantized_params=sum(a * b * c for _, a, b, c in lin),
                    disk_bytes=int(checkpoints) if gradient_checkpointing == "offload_disk" else 0,
                    block_scales=scales)
    return Plan(items, sum(host_items.values()), total, dev, fits, settings, host_items)


def _trained(items: dict, lin, targets: set[str], lora_r: int, kind, page_bytes: int, scales: int) -> tuple:
    """LoRA's parameters and gradients (and the block scales' when they train) and their optimizer state into
    ``items``; returns (LoRA's parameter count, optimizer bytes waiting on the host)."""
    lora = sum(lora_r * (a + b) * c for n, a, b, c in lin if n in targets)
    items["lora_params"] = items["gradients"] = 4 * lora
    if scales:
        items["block_scales"] = 8 * scales
    state = int((lora + scales) * kind.state_bytes_per_param)
    items["optimizer_state"] = min(state, page_bytes or kind.default_budget_bytes()) if kind.paged else state
    return lora, state - items["optimizer_state"]


def _layer_bytes_per_token(f: Shapes, targets: set[str], lora_r: int, dbytes: int, row: int, tiled_mlp,
                           num_shards: int) -> tuple[float, int]:
    """(what one decoder layer's training step keeps per token, the MLP's shards) for rows of ``row`` tokens (see the
    module docstring; tiled: one shard's intermediates and the joined output)."""
    # adapted layers a token passes through per decoder layer (an expert's only when routed to it)
    n_adapted = sum(x.count / f.L * (f.topk / f.experts if x.expert else 1) for x in f.layers if x.path in targets)
    shards = shard_count(row, f.h, int(f.mlp_per_token), num_shards or None) \
        if tiles(tiled_mlp, row) and f.experts == 1 else 1
    mlp = (6 if f.experts > 1 else 4) * f.mlp_per_token / shards + (2 * f.h if shards > 1 else 0)
    return (12 * f.h + 4 * f.kv + mlp + 2 * lora_r * n_adapted + 4 * f.heads + 8) * dbytes / 2, shards


def _generation(items: dict, f: Shapes, rows: int, length: int, dbytes: int) -> int:
    """What a GRPO step's sampling holds beyond the training step's activations (see the module docstring)."""
    kv = rows * length * f.L * 2 * f.kv * dbytes
    training = sum(items.get(k, 0) for k in ("activations", "logits_and_loss", "backward_and_allocator"))
    return max(0, int(kv + 3 * 4 * rows * f.vocab - training))


def _checked(sequence_len, micro_batch_size, lora_r, load_in_4bit, quant_type, blocksize, optimizer, compute_dtype,
             device):
    """(optimizer kind, compute dtype name) after checking ``plan``'s settings (one-line errors)."""
    for name, v in (("sequence_len", sequence_len), ("micro_batch_size", micro_batch_size), ("lora_r", lora_r)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise LowbitError(f"{name} must be a positive integer, got {v!r}")
    if load_in_4bit:
        check_quant_type(quant_type)
        check_blocksize(blocksize)
    dtype = canonical(compute_dtype, "compute_dtype", auto=True)
    return check_optimizer(optimizer), default_compute_dtype_name(device) if dtype == "auto" else dtype


def _weights(lin, f: Shapes, dbytes: int, quant_type: str | None, double_quant: bool, blocksize: int) -> dict:
    """The base: 4-bit codes and their constants (``quant_type`` None: linear layers in the compute dtype), and
    what is never quantized (embeddings, untied head, norms, MoE router)."""
    qnumel = sum(a * b * c for _, a, b, c in lin)
    items = {"quantized_weights": 0, "quant_constants": 0}
    if quant_type == INT8:  # LLM.int8: a byte per weight, a float32 scale per output row
        items["quantized_weights"] = qnumel
        items["quant_constants"] = 4 * sum(b * c for _, a, b, c in lin)
    elif quant_type is not None:
        bits = QUANT_TYPES[quant_type].storage_bits
        items["quantized_weights"] = sum(c * packed_bytes(a * b, bits) for _, a, b, c in lin)
        blocks = _blocks(lin, blocksize)
        if double_quant:
            nested = _blocks(lin, blocksize, lambda k: -(-k // NESTED_BLOCKSIZE))
            items["quant_constants"] = blocks + 4 * nested + 4 * sum(c for *_, c in lin)
        else:
            items["quant_constants"] = 4 * blocks
        if QUANT_TYPES[quant_type].zero_point:  # a packed zero point per block (quant/zero_point.py)
            items["quant_constants"] += _blocks(lin, blocksize, lambda k: packed_bytes(k, bits))
    items["unquantized_params"] = f.other_params * dbytes + (0 if quant_type is not None else qnumel * dbytes)
    return items


def _blocks(lin, blocksize: int, per=lambda k: k) -> int:
    """Blocks of ``blocksize`` weights over the quantized linear layers (one scale each), or ``per`` of each
    layer's block count summed (its nested constants, its packed zero points)."""
    return sum(c * per(-(-a * b // blocksize)) for _, a, b, c in lin)


def _trained_whole(names: list | None, f: Shapes) -> int:
    """Parameters trained whole in float32 (``lora_modules_to_save``): the embeddings and the head (once when tied);
    other modules (norms) are small enough to leave out."""
    names = {str(n).rsplit(".", 1)[-1] for n in names or []}
    mats = ("embed_tokens" in names) + ("lm_head" in names and not (f.tied and "embed_tokens" in names))
    return mats * f.vocab * f.h


def _mode(distributed: str, world_size: int) -> str:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise LowbitError(f"world_size must be a positive integer, got {world_size!r}")
    if distributed not in DISTRIBUTED:
        raise LowbitError(f"distributed must be one of {', '.join(DISTRIBUTED)}, got {distributed!r}")
    if world_size == 1:
        return "none"
    if distributed == "none":
        raise LowbitError(f"world_size {world_size} with distributed: none: choose ddp or fsdp")
    return "ddp" if distributed == "auto" else distributed


def _shard(items: dict, n: int, layers: int, lora_layer: float) -> None:
    """FSDP: the sharded items / n, plus the gathered copies (see the module docstring)."""
    base_layer = (items["quantized_weights"] + items["quant_constants"]) / layers
    root = items["unquantized_params"]
    for k in ("quantized_weights", "quant_constants", "unquantized_params", "lora_params", "gradients",
              "optimizer_state"):
        items[k] = -(-items[k] // n)
    items["fsdp_gathered"] = int(2 * base_layer + root + 2 * lora_layer)


def _overheads(items: dict, act: float, layer_act: float, act_without_checkpointing: float,
               gradient_checkpointing: bool, device: str, hidden_bytes: float = 0, device_back: float = 0) -> dict:
    """Backward's transients, the allocators' slack and the runtime: on a GPU simulated with checkpointing
    (``device_backward.py``: ``device_back``), estimated without, plus the allocator's slack and the CUDA context
    (estimates); on the CPU measured (``host_backward.py``), plus the data pipeline there."""
    if device == "cuda":
        back = device_back if gradient_checkpointing else 0.5 * act
        return {"backward_and_allocator": int(back + 0.05 * sum(items.values())),
                "framework_overhead": int(0.75 * GIB)}
    back = host_backward_bytes(layer_act, act_without_checkpointing, gradient_checkpointing, hidden_bytes)
    return {"backward_and_allocator": back, "framework_overhead": 32 << 20,
            "data_pipeline": DATA_PIPELINE_CPU}


def config_settings(cfg, device: str = "cuda", world_size: int = 1) -> dict:
    """``plan``'s keyword arguments for the run ``train(cfg)`` does (``cfg`` a ``TrainConfig``) on each of
    ``world_size`` ranks."""
    grpo = getattr(cfg, "rl", "") == "grpo"
    completion = grpo_spec_from(cfg).max_completion_length if grpo else 0
    return {**{k: getattr(cfg, k) for k in PLAN_KEYS}, "device": device,
            "page_bytes": int(cfg.optimizer_budget_mb * 2**20), "world_size": world_size,
            "rows_per_sample": 2 if getattr(cfg, "rl", "") in PAIRED else 1, "completion_len": completion,
            "generation_rows": cfg.micro_batch_size * cfg.gradient_accumulation_steps if grpo else 0}


def plan_config(cfg, device_memory=None, device: str = "cuda", world_size: int = 1) -> Plan:
    """The plan of the run ``train(cfg)`` does (per rank, under torchrun with ``world_size`` processes)."""
    return plan(cfg.base_model, **config_settings(cfg, device, world_size), device_memory=device_memory)


def largest(model, what: str, device_memory, **kw) -> int:
    """The largest ``sequence_len`` or ``micro_batch_size`` that fits (0 if even 1 does not)."""
    if what not in ("sequence_len", "micro_batch_size"):
        raise LowbitError(f"largest: what must be sequence_len or micro_batch_size, got {what!r}")
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
