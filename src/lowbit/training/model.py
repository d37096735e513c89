"""The model a run trains: the base (quantized while it streams in), grown by the tokenizer's new tokens, with LoRA on
the configured layers and whatever else the config trains.

    load (io/loader.py)        4-bit / 8-bit / 16-bit base; ``model_config`` overrides of config.json
    new tokens                 the embeddings and the head grow (``resize_token_embeddings``: to a multiple of 32 with
                               ``resize_token_embeddings_to_32x``; new rows random, or the old rows' mean with
                               ``mean_resizing_embeddings``) and those rows train (``nn/trainable.py``)
    LoRA                       ``lora_target_modules`` (+ the expert matrices ``lora_target_parameters`` names);
                               started from ``lora_model_dir``'s weights when given
    trained whole              ``lora_modules_to_save`` / ``unfrozen_parameters`` (float32)
    NEFTune                    ``neftune_noise_alpha``: uniform noise of size α/√(L·d) on the input embeddings while
                               training (Jain et al., 2023), never in evaluation
    checkpointing              decoder layers recomputed in backward (non-reentrant)
    tiled_mlp                  the MLP blocks run over shards of the sequence (``nn/tiled_mlp.py``; auto: rows
                               of ``nn.mlp_shards.AUTO_TILED_TOKENS`` or more)
    attention                  transformers' SDPA becomes ``nn/document_attention.py``'s: packed rows without an
                               L×L mask
    host memory                on the CPU, freed heap pages go back to the OS between layers (``host_memory.py``)
    compile                    the decoder layers' training forwards through torch.compile (``nn/compiled_layers.py``;
                               auto: on the CPU, models of ``COMPILE_MIN_PARAMS`` or more, one process)
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from ..errors import LowbitError
from ..io.adapters import read_adapter, set_adapter_weights
from ..io.loader import SourceWeights, load
from ..io.tokenizer import TokenizerChanges
from ..nn.block_scales import train_block_scales
from ..nn.compiled_layers import compile_layers, compiler_missing, not_compiled_because
from ..nn.document_attention import recompute_contexts, use_document_attention
from ..nn.lora import LoRALinear, add_lora, count_parameters, linear_module_names
from ..nn.mlp_shards import tiles
from ..nn.tiled_mlp import tile_mlps
from ..nn.trainable import add_trainable_rows, train_modules
from .calibrated_base import lora_start
from .config import TrainConfig
from .host_memory import release_between_layers

__all__ = ["load_model", "prepare_model", "grow_vocabulary", "expert_targets_for", "add_neftune", "apply_compile"]

COMPILE_MIN_PARAMS = 100_000_000  # compile: auto from this many parameters (SmolLM2-135M has 135 M)


def grow_vocabulary(model: nn.Module, size: int, to_32x: bool = False, mean: bool = False, seed: int = 0) -> None:
    """Give the embeddings (and an untied head) rows for a vocabulary of ``size`` tokens."""
    rows = model.get_input_embeddings().weight.shape[0]
    if size <= rows:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(size, pad_to_multiple_of=32 if to_32x else None, mean_resizing=mean)


def expert_targets_for(model: nn.Module, params: list[str] | None) -> list[str]:
    """The expert LoRA layers ``lora_target_parameters`` names (``experts.gate_up_proj`` → every expert's
    ``….experts.<e>.gate_up_proj``)."""
    out = []
    names = linear_module_names(model)
    for p in params or []:
        head, _, leaf = p.rpartition(".")
        rx = re.compile(rf"(.*\.)?{re.escape(head)}\.\d+\.{re.escape(leaf)}")
        hits = [n for n in names if rx.fullmatch(n)]
        if not hits:
            raise LowbitError(f"lora_target_parameters: no expert parameter {p!r} in this model (it has no "
                              "mixture-of-experts layers of that name)")
        out += hits
    return out


def add_neftune(model: nn.Module, alpha: float) -> None:
    """NEFTune on the input embeddings (see the module docstring)."""
    emb = model.get_input_embeddings()

    def hook(module, args, out):
        if module.training and alpha > 0:
            mag = alpha / math.sqrt(out.shape[-2] * out.shape[-1])
            out = out + torch.empty_like(out).uniform_(-mag, mag)
        return out

    emb.register_forward_hook(hook)


def load_model(cfg: TrainConfig, dtype, log=print, base: str | None = None,
               tokens: TokenizerChanges | None = None, vocab_size: int | None = None, device="cpu") -> nn.Module:
    """The base (``base``: another folder holding it, e.g. the calibrated one) with LoRA and the rest of what
    ``cfg`` trains, on ``device``; ``tokens``/``vocab_size``: the tokenizer's new tokens and its length."""
    model = load(base or cfg.base_model, cfg.quant_spec(), compute_dtype=dtype,
                 trust_remote_code=cfg.trust_remote_code, config_overrides=cfg.model_config, device=device,
                 quantize_vision=cfg.quantize_vision)
    if vocab_size:
        grow_vocabulary(model, vocab_size, cfg.resize_token_embeddings_to_32x, cfg.mean_resizing_embeddings, cfg.seed)
    lora = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora,
                init=cfg.lora_init, verbose=False)
    missing: list[str] = []
    targets = cfg.lora_target_modules
    if cfg.lora_target_parameters:
        from ..nn.lora import select_targets

        targets = sorted(set(select_targets(model, targets, cfg.lora_r, missing))
                         | set(expert_targets_for(model, cfg.lora_target_parameters)))
    start = lora_start(cfg, base) if base else None
    if start is not None:  # trained with the codes by blockwise calibration: LoftQ's role, done already
        add_lora(model, target_modules=targets, **{**lora, "init": "default"}, missing=missing)
        _copy_start(model, start, base)
    elif cfg.lora_init == "loftq":
        with SourceWeights(model) as source:
            add_lora(model, target_modules=targets, **lora, source_weight=source, missing=missing)
    else:
        add_lora(model, target_modules=targets, **lora, missing=missing)
    if missing:
        log(f"lora_target_modules: this model has no layer named {', '.join(sorted(set(missing)))} (as peft, the "
            "names that match are adapted)")
    rows = _trainable_rows(cfg, tokens)
    if rows:
        add_trainable_rows(model, rows)
    unmatched: list[str] = []
    whole = train_modules(model, cfg.lora_modules_to_save, cfg.unfrozen_parameters, unmatched)
    if unmatched:
        log(f"unfrozen_parameters: {', '.join(map(repr, unmatched))} match no parameter of this model")
    scaled = _train_scales(model) if cfg.train_quant_scales else 0
    if cfg.lora_model_dir:
        _start_from(model, cfg.lora_model_dir)
    if cfg.neftune_noise_alpha:
        add_neftune(model, cfg.neftune_noise_alpha)
    trainable, total = count_parameters(model)
    spec = cfg.quant_spec()
    extra = (f"; trained whole: {', '.join(whole)}" if whole else "") + \
        (f"; rows of {len(set().union(*rows.values()))} tokens trained" if rows else "") + \
        (f"; the block scales of {scaled} 4-bit layers trained (codes frozen)" if scaled else "")
    log(f"model: {base or cfg.base_model} ({f'{spec.quant_type} base, {spec}' if spec else 'unquantized'}, compute "
        f"{str(dtype).split('.')[-1]}); LoRA r={cfg.lora_r}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%){extra}")
    prepare_model(cfg, model, total, log)
    return model


def prepare_model(cfg: TrainConfig, model: nn.Module, params: int, log) -> None:
    """How ``cfg`` runs a loaded model with its adapters (attention, heap trims, tiled MLP, checkpointing, compile):
    the tail of ``load_model``, also what the benches call on a model they built themselves."""
    _check_packed_mixers(cfg, model)
    use_document_attention(model)
    release_between_layers(model)
    if tiles(cfg.tiled_mlp, cfg.sequence_len):
        n = tile_mlps(model, cfg.tiled_mlp_num_shards or None)
        log(f"tiled_mlp: {n} MLP blocks run over shards of the sequence" if n else
            "tiled_mlp: this model has no dense MLP blocks to tile (mixture-of-experts blocks run whole)")
    if cfg.checkpointing:
        _checkpoint_layers(model)
    apply_compile(cfg, model, params, log)


def apply_compile(cfg: TrainConfig, model: nn.Module, params: int, log) -> None:
    """``compile``: true compiles the decoder layers (``nn/compiled_layers.py``); auto does so on the CPU (where it
    was measured; on a GPU it is not yet) for models of ``COMPILE_MIN_PARAMS`` or more in a single process (smaller
    ones spend more compiling than it saves them)."""
    if not cfg.compile:
        return
    device = next(model.parameters()).device.type
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    missing = compiler_missing(device) or not_compiled_because(model) or \
        ("lowbit does not compile layers under torchrun yet" if several else None)
    if cfg.compile == "auto" and (missing or params < COMPILE_MIN_PARAMS or device != "cpu"):
        return
    if missing:
        log(f"compile: {missing}, so the layers run uncompiled")
    else:
        n = compile_layers(model)
        log(f"compile: {n} decoder layers through torch.compile (built in the first steps, cached for later runs)")


def _train_scales(model: nn.Module) -> int:
    """``train_quant_scales``: every 4-bit layer's block scales train (``nn/block_scales.py``); returns how many."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LowbitError("train_quant_scales: not built under torchrun yet (sharded block scales are untested); "
                          "train on one process, or leave it false")
    n = len(train_block_scales(model))
    if not n:
        raise LowbitError("train_quant_scales: this model has no 4-bit layers whose block scales could train")
    return n


def _check_packed_mixers(cfg: TrainConfig, model: nn.Module) -> None:
    """Packed rows train without a cache, and then transformers' Mamba layers (GraniteMoeHybrid's) take a fused path
    that reads ``out_proj.weight`` itself: a LoRA there would fail (peft's would be skipped). Refused in one line."""
    if not cfg.sample_packing:
        return
    for name, mod in model.named_modules():
        if "Mamba" in type(mod).__name__ and isinstance(getattr(mod, "out_proj", None), LoRALinear):
            raise LowbitError(f"sample_packing: {name}.out_proj carries LoRA, but this model's Mamba layers read "
                              "out_proj's weight directly when training packed rows; leave out_proj out of "
                              "lora_target_modules or set sample_packing: false")


def _checkpoint_layers(model: nn.Module) -> None:
    """Non-reentrant gradient checkpointing of the decoder layers, without transformers' input-embedding hooks."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_contexts})
    # transformers also hooks every input embedding (a VLM's patch embedding too) to make its output require grad,
    # which only reentrant checkpointing needs: autograd would then keep a frozen vision tower's activations and run
    # its backward, and compute the first layer's input gradient, all for nothing.
    model.disable_input_require_grads()
    if getattr(model.config, "use_cache", None):  # training never uses the cache (sampling asks for it itself)
        model.config.use_cache = False


def _trainable_rows(cfg: TrainConfig, tokens: TokenizerChanges | None) -> dict[str, list[int]]:
    """{embed_tokens / lm_head: rows to train}: the new tokens' rows and ``trainable_token_indices``."""
    rows: dict[str, set[int]] = {}
    if tokens and tokens.added:
        rows["embed_tokens"] = set(tokens.added)
        rows["lm_head"] = set(tokens.added)
    tti = cfg.trainable_token_indices
    if isinstance(tti, list):
        rows.setdefault("embed_tokens", set()).update(int(i) for i in tti)
    elif isinstance(tti, dict):
        for k, v in tti.items():
            if k not in ("embed_tokens", "lm_head"):
                raise LowbitError(f"trainable_token_indices: {k!r} — rows of embed_tokens or lm_head train")
            rows.setdefault(k, set()).update(int(i) for i in v)
    if cfg.lora_modules_to_save:  # a module trained whole needs no trained rows
        for k in list(rows):
            if any(k == n.rsplit(".", 1)[-1] for n in cfg.lora_modules_to_save):
                del rows[k]
    return {k: sorted(v) for k, v in rows.items() if v}


def _start_from(model: nn.Module, folder: str) -> None:
    """LoRA (and trained modules) start from the adapter in ``folder`` (a finished run, or one peft wrote)."""
    _, tensors, _ = read_adapter(folder)
    set_adapter_weights(model, tensors, folder)


@torch.no_grad()
def _copy_start(model: nn.Module, start: dict, base: str) -> None:
    """The LoRA layers take the start blockwise calibration trained (every adapted layer needs one)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    if set(layers) != set(start):
        raise LowbitError(f"{base}: its LoRA start covers {len(start)} layers, this run adapts {len(layers)} "
                          f"(lora_target_modules changed? remove {base} to calibrate again)")
    for n, (a, b) in start.items():
        layers[n].lora_A.weight.copy_(a)
        layers[n].lora_B.weight.copy_(b)
