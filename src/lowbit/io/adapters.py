"""LoRA adapters in the PEFT format: what peft (and so vLLM) load, and what lowbit reads back from peft.

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, use_rslora, …
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight (r × in), ….lora_B.weight (out × r)

Expert adapters are written in peft's ``target_parameters`` form (``peft_experts.py``); LoRA over GPT-2's
``Conv1D`` layers sets ``fan_in_fan_out`` as peft expects for them.

The base an adapter was trained on (name and content fingerprint) goes into the safetensors header, where
peft does not look — peft warns about unknown keys in adapter_config.json — and ``load_adapter`` refuses an
adapter trained on another base unless forced. The config.json fields the run replaced (``model_config``: a
``rope_scaling`` to train past the native length, ``max_position_embeddings``) go there too, as JSON:
``adapter_config_overrides`` reads them, so that generating, merging and exporting load the base with the same
positions (peft and vLLM users set them on the base themselves).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..atomic import writing_dir, writing_file
from ..errors import LowbitError
from ..jsonfile import read_object
from ..nn.lora import LoRALinear, add_lora, is_conv1d, linear_module_names, lora_state_dict, output_head_names
from ..nn.trainable import TrainableRows, trainable_rows, trained_modules
from .loader import base_info
from .peft_experts import expert_targets, from_peft, to_peft
from .quant_scales import SCALES_FILE, apply_scales, read_scales, scale_tensors, split_scales, write_scales
from .safetensors import open_safetensors

__all__ = ["ADAPTER_FILES", "adapter_config", "adapter_config_overrides",
           "save_adapter", "write_adapter_files", "read_adapter", "load_adapter", "check_adapter_base",
           "set_adapter_weights", "adapter_tensors", "is_lora_key", "lora_key_module"]

ROWS_KEY = "token_adapter.trainable_tokens_delta"  # peft's name for trained embedding rows

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def peft_targets(net: nn.Module, adapted: list[str]) -> list[str] | str:
    """``target_modules`` for peft: the layers' short names when peft, matching them anywhere, finds exactly the
    adapted layers; else (a vision tower with the same names, some layers only) a regular expression that peft
    full-matches: the layer numbers as ``\\d+`` where that still finds exactly them, else every name."""
    short = sorted({n.split(".")[-1] for n in adapted})
    heads = output_head_names(net)
    names = [n for n in linear_module_names(net) if n not in heads]
    if not adapted or {n for n in names if n.split(".")[-1] in short} == set(adapted):
        return short
    general = sorted({r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in n.split("."))
                      for n in adapted})
    pattern = "(" + "|".join(general) + ")"
    if {n for n in names if re.fullmatch(pattern, n)} == set(adapted):
        return pattern
    return "(" + "|".join(map(re.escape, sorted(adapted))) + ")"


def adapter_config(net: nn.Module) -> dict:
    loras = {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise LowbitError("the model has no LoRA adapters to save")
    first = next(iter(loras.values()))
    experts = expert_targets(net)
    params = [f"{mod}.{m}" for mod, mats in experts.items() for m in mats]
    in_experts = tuple(f"{mod}." for mod in experts)
    targets = peft_targets(net, [n for n in loras if not n.startswith(in_experts)])
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "target_modules": targets,
        **({"target_parameters": params} if params else {}),
        "use_rslora": first.use_rslora, "bias": "none",
        "fan_in_fan_out": any(is_conv1d(m.base) or n in base_info(net).transposed for n, m in loras.items()),
        "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": trained_modules(net) or None,
        "trainable_token_indices": _row_config(net), "ensure_weight_tying": _tied_and_trained(net),
        "base_model_name_or_path": base_info(net).name,
        "revision": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None,
    }


def _row_config(net: nn.Module) -> dict | None:
    """peft's ``trainable_token_indices``: {embed_tokens: rows, lm_head: rows (an untied head only)}."""
    out = {}
    for path, m in trainable_rows(net).items():
        shared = path != _first_owner(net, m.delta)
        if not shared:
            out[path.rsplit(".", 1)[-1]] = m.indices.tolist()
    return out or None


def _tied_and_trained(net: nn.Module) -> bool:
    """The embeddings are tied to the head and trained whole: lowbit keeps one trained matrix, and tells peft to keep
    the tie too (``ensure_weight_tying``; peft ties trained rows by itself)."""
    emb = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    tied = bool(getattr(getattr(net, "config", None), "tie_word_embeddings", False))
    return tied and isinstance(emb, nn.Embedding) and emb.weight.requires_grad


def _first_owner(net: nn.Module, delta) -> str:
    return next(p for p, m in net.named_modules() if isinstance(m, TrainableRows) and m.delta is delta)


def adapter_tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    """Everything an adapter holds, under peft's key names: LoRA's factors (``lora_state_dict``), trained
    embedding rows (``<path>.token_adapter.trainable_tokens_delta``) and modules trained whole (``<path>.<param>``);
    trained block scales (``quant_scales.py``); whole tensors (gathered under FSDP: every rank must call this)."""
    whole = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().contiguous().clone()
    out = lora_state_dict(net)
    for path, m in trainable_rows(net).items():
        if path == _first_owner(net, m.delta):
            out[f"base_model.model.{path}.{ROWS_KEY}"] = whole(m.delta)
    for path in trained_modules(net):
        for leaf, t in net.get_submodule(path)._parameters.items():
            if t is not None:
                out[f"base_model.model.{path}.{leaf}"] = whole(t)
    return {**out, **scale_tensors(net, whole)}


def _metadata(net: nn.Module) -> dict[str, str]:
    """Which base the adapter was trained on, and its vocabulary size (safetensors header strings)."""
    info = base_info(net)
    emb = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    return {"format": "pt", "lowbit_base_name": str(info.name), "lowbit_base_fingerprint": str(info.fingerprint),
            "lowbit_quant_type": str(info.quant.quant_type if info.quant else None),
            **({"lowbit_model_config": json.dumps(info.config_overrides, sort_keys=True)}
               if info.config_overrides else {}),
            **({"lowbit_vocab_size": str(emb.weight.shape[0])} if emb is not None else {})}


def save_adapter(net: nn.Module, out: str | os.PathLike, overwrite: bool = True,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as peft does.

    Into a new or adapter-only folder: the folder is built aside and renamed into place. Into a folder holding
    other things (a run's metrics and checkpoints): each of the two files is replaced atomically; the rest of
    the folder is not touched. ``tensors``: the adapter's tensors when already gathered (``adapter_tensors``).
    """
    out = Path(out)
    others = out.is_dir() and any(p.name not in (*ADAPTER_FILES, SCALES_FILE) for p in out.iterdir())
    if not others:
        with writing_dir(out, overwrite) as tmp:
            write_adapter_files(net, tmp, tensors=tensors)
        return out
    if not overwrite and any((out / f).exists() for f in ADAPTER_FILES):
        raise LowbitError(f"{out}: already holds an adapter (use --overwrite to replace it)")
    tensors = adapter_tensors(net) if tensors is None else tensors
    scaled = bool(split_scales(tensors)[1])
    with writing_file(out / ADAPTER_FILES[0]) as weights, writing_file(out / ADAPTER_FILES[1]) as config, \
            (writing_file(out / SCALES_FILE) if scaled else contextlib.nullcontext()) as scales:
        write_adapter_files(net, weights.parent, weights.name, config.name, tensors=tensors,
                            scales=scales.name if scaled else SCALES_FILE)
    if not scaled:  # an earlier adapter's block scales must not stay beside this one
        (out / SCALES_FILE).unlink(missing_ok=True)
    return out


def write_adapter_files(net: nn.Module, folder: Path, weights: str = ADAPTER_FILES[0],
                        config: str = ADAPTER_FILES[1], tensors: dict[str, torch.Tensor] | None = None,
                        scales: str = SCALES_FILE) -> None:
    """The two adapter files (and trained block scales' third), written into ``folder`` as they are (callers make
    it atomic)."""
    from safetensors.torch import save_file

    cfg = adapter_config(net)
    tensors, trained_scales = split_scales(adapter_tensors(net) if tensors is None else tensors)
    tensors, _ = to_peft(net, tensors)
    save_file(tensors, str(folder / weights), metadata=_metadata(net))
    if trained_scales:
        write_scales(trained_scales, folder / scales, _metadata(net))
    (folder / config).write_text(json.dumps(cfg, indent=2) + "\n")


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """``(adapter_config, tensors, safetensors metadata)`` of a PEFT adapter folder."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / ADAPTER_FILES[1], path / ADAPTER_FILES[0]
    if not cfg_path.exists():
        raise LowbitError(f"{path}: no adapter_config.json — not a PEFT adapter folder")
    cfg = read_object(cfg_path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LowbitError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    if not w_path.exists():
        raise LowbitError(f"{path}: no adapter_model.safetensors")
    with open_safetensors(w_path) as h:
        meta = h.metadata() or {}
    try:
        tensors = load_file(str(w_path))
    except Exception as e:
        raise LowbitError(f"{w_path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
    return cfg, {**tensors, **read_scales(path)}, meta


def adapter_config_overrides(path: str | os.PathLike) -> dict | None:
    """The config.json fields the adapter's run replaced (None: none), from its safetensors header."""
    w_path = Path(path) / ADAPTER_FILES[0]
    if not w_path.exists():
        return None
    with open_safetensors(w_path) as h:
        text = (h.metadata() or {}).get("lowbit_model_config")
    try:
        out = json.loads(text) if text else None
    except ValueError:
        raise LowbitError(f"{w_path}: its lowbit_model_config header is not JSON") from None
    if out is not None and not isinstance(out, dict):
        raise LowbitError(f"{w_path}: its lowbit_model_config header is not a mapping")
    return out


def is_lora_key(k: str) -> bool:
    return re.search(r"\.lora_[AB](\.[A-Za-z0-9_]+)?\.weight$", k) is not None


def lora_key_module(k: str) -> str:
    """The module path a LoRA key (peft's naming) belongs to."""
    return re.sub(r"^base_model\.model\.|\.lora_[AB](\.[A-Za-z0-9_]+)?\.weight$", "", k)


def load_adapter(net: nn.Module, path: str | os.PathLike, force: bool = False, trainable: bool = False) -> nn.Module:
    """Add the adapter in ``path`` (saved by lowbit or by peft) to ``net``: its LoRA layers, and the embedding rows
    and modules it trained (the vocabulary grown first when it added tokens)."""
    cfg, tensors, meta = read_adapter(path)
    if not force:
        check_adapter_base(net, meta, path)
    tensors, scales = split_scales(tensors)
    tensors = from_peft(net, tensors, path)
    _grow_for(net, cfg, tensors, meta, Path(path))
    names = sorted({lora_key_module(k) for k in tensors if is_lora_key(k)})
    present = set(linear_module_names(net))
    missing = [n for n in names if n not in present]
    if missing:
        raise LowbitError(f"{path}: adapter has layers the model lacks, e.g. {missing[0]!r}")
    try:
        r = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", r))
        dropout = float(cfg.get("lora_dropout", 0.0)) if trainable else 0.0
    except (TypeError, ValueError) as e:
        raise LowbitError(f"{path}/adapter_config.json: bad r / lora_alpha / lora_dropout ({e})") from None
    if names:
        add_lora(net, r=r, alpha=alpha, dropout=dropout, target_modules=f"({'|'.join(map(re.escape, names))})",
                 use_rslora=bool(cfg.get("use_rslora", False)), verbose=False)
    set_adapter_weights(net, {k: v for k, v in tensors.items() if is_lora_key(k)}, path)
    _apply_extras(net, {k: v for k, v in tensors.items() if not is_lora_key(k)}, cfg, path)
    for n in names:
        for ab in ("lora_A", "lora_B"):
            getattr(net.get_submodule(n), ab).weight.requires_grad_(trainable)
    apply_scales(net, scales, path, trainable)
    return net


def check_adapter_base(net: nn.Module, meta: dict, path) -> None:
    """Refuse an adapter (``meta``: its safetensors header) trained on another base, or with other config.json
    fields (``model_config``) than the base was loaded with."""
    info = base_info(net)
    want, have = meta.get("lowbit_base_fingerprint"), info.fingerprint
    if want not in (None, "None") and have and want != have:
        raise LowbitError(f"{path}: adapter was trained on base {meta.get('lowbit_base_name')!r} (fingerprint "
                          f"{want}), not on {info.name!r} ({have}); use --force to apply it anyway")
    trained_with = json.loads(meta["lowbit_model_config"]) if meta.get("lowbit_model_config") else {}
    if any((info.config_overrides or {}).get(k) != v for k, v in trained_with.items()):
        raise LowbitError(f"{path}: adapter was trained with model_config {trained_with}, the base is loaded with "
                          f"{info.config_overrides}; load it with config_overrides={trained_with} (lowbit's commands "
                          "do) or use --force")


def _grow_for(net: nn.Module, cfg: dict, tensors: dict, meta: dict, path: Path) -> None:
    """Grow the vocabulary to the adapter's (it added tokens): the size its file records, its trained embedding
    matrix, its highest trained row, or its tokenizer's length."""
    emb = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    if emb is None:
        return
    sizes = [int(meta.get("lowbit_vocab_size") or 0)]
    sizes += [t.shape[0] for k, t in tensors.items() if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    sizes += [max(rows) + 1 for rows in (cfg.get("trainable_token_indices") or {}).values()
              if isinstance(rows, list) and rows]
    if not meta.get("lowbit_vocab_size") and (path / "tokenizer_config.json").exists():
        from .tokenizer import load_tokenizer

        sizes.append(len(load_tokenizer(path)))
    if max(sizes) > emb.weight.shape[0]:
        net.resize_token_embeddings(max(sizes), mean_resizing=False)


@torch.no_grad()
def _apply_extras(net: nn.Module, tensors: dict, cfg: dict, path) -> None:
    """Trained embedding rows (written into the embeddings — and a tied head — or into the model's
    ``TrainableRows``) and modules trained whole (their weights replaced)."""
    rows_cfg = cfg.get("trainable_token_indices") or {}
    for key, t in tensors.items():
        name = re.sub(r"^base_model\.model\.", "", key)
        if name.endswith("." + ROWS_KEY):
            owner = name[: -len(ROWS_KEY) - 1]
            mod = net.get_submodule(owner.removesuffix(".base")) if _has(net, owner) else None
            if mod is None:
                raise LowbitError(f"{path}: trained rows for {owner!r}, which the model lacks")
            if isinstance(mod, TrainableRows):
                mod.delta.copy_(t)
                continue
            rows = rows_cfg.get(owner.rsplit(".", 1)[-1]) or rows_cfg.get(owner)
            if rows is None or len(rows) != t.shape[0]:
                raise LowbitError(f"{path}: {key} has {t.shape[0]} rows but adapter_config.json lists "
                                  f"{len(rows or [])} trainable_token_indices for it")
            mod.weight[torch.tensor(rows, device=mod.weight.device)] = t.to(mod.weight.device, mod.weight.dtype)
            continue
        owner, _, leaf = name.rpartition(".")
        if not _has(net, owner) or getattr(net.get_submodule(owner), leaf, None) is None:
            raise LowbitError(f"{path}: adapter holds {key!r}, which the model lacks")
        dst = getattr(net.get_submodule(owner), leaf)
        if tuple(dst.shape) != tuple(t.shape):
            raise LowbitError(f"{path}: {key} has shape {tuple(t.shape)}, the model needs {tuple(dst.shape)}")
        dst.copy_(t.to(dst.dtype))


def _has(net: nn.Module, path: str) -> bool:
    try:
        net.get_submodule(path)
        return True
    except AttributeError:
        return False


@torch.no_grad()
def set_adapter_weights(net: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy adapter tensors (peft key names, with or without the ``.default`` adapter name) into the model's
    LoRA layers, checking that every layer gets both matrices in the right shape; trained rows and modules (when
    the tensors hold them) into the model's ``TrainableRows`` and trained modules, block scales into its 4-bit
    layers."""
    tensors, scales = split_scales(tensors)
    tensors = from_peft(net, tensors, path)
    for n, mod in net.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        for ab in ("lora_A", "lora_B"):
            keys = (f"base_model.model.{n}.{ab}.weight", f"base_model.model.{n}.{ab}.default.weight")
            key = next((k for k in keys if k in tensors), None)
            if key is None:
                raise LowbitError(f"{path}: missing {ab} for {n}")
            dst = getattr(mod, ab).weight
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise LowbitError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs "
                                  f"{tuple(dst.shape)}")
            dst.copy_(tensors[key])
    extras = {k: v for k, v in tensors.items() if not is_lora_key(k)}
    if extras:
        _apply_extras(net, extras, {}, path)
    apply_scales(net, scales, path)
