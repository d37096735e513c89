"""LoRA adapters: a frozen base linear layer plus a trainable low-rank update.

    y = base(x) + B·A·dropout(x) · s,      s = alpha / r   (rsLoRA: alpha / √r)

A (r × in) starts kaiming-uniform (a = √5), B (out × r) starts at zero, so training starts from the base
model exactly. ``loftq_init`` instead starts from the quantization error: it looks for Q and B·A with
W ≈ Q + s·B·A, alternating "quantize W − s·B·A" and "best rank-r fit of W − deq(Q)" (SVD), which
lets an NF3 base recover part of what quantization lost before any training (NF2 errors are too large for a
low-rank fit to absorb much: on SmolLM2 r=16 moves its relative weight error only from 0.567 to 0.533).
Parameter names (``lora_A.weight``, ``lora_B.weight``) are the ones peft saves.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import LowbitError
from ..quant.tensor import quantize
from .experts import Experts
from .linear import Linear4bit, parameter_counts
from .linear8bit import QUANTIZED
from .lora_options import ALL_LINEAR, ALL_LINEAR_EXPERTS, LORA_INITS, PEFT_REFUSED, lora_scaling, target_names
from .vision import float_layer_names

__all__ = ["LoRALinear", "add_lora", "adapters_disabled", "lora_state_dict", "linear_module_names",
           "output_head_names", "loftq_init",
           "is_conv1d", "is_plain_linear", "expert_layer_names", "select_targets", "mixer_layer_names"]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise LowbitError(f"lora_r must be a positive integer, got {r!r}")
        self.base = base
        self.in_features, self.out_features = in_out(base)
        if r > min(self.in_features, self.out_features):
            raise LowbitError(f"lora_r={r} is larger than the layer ({self.out_features}x{self.in_features})")
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # made and initialised on the host with the CPU generator, whatever device the base is on: the same start
        # on a GPU as on the CPU (add_lora then moves them to the base's device)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device="cpu")
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device="cpu")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False  # adapters_disabled(): the base alone (a preference run's reference model)
        for p in base.parameters():
            p.requires_grad_(False)

    def factors(self, device_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
        """(A, B, dtype) the product is computed with: the autocast dtype when autocast is on, else A's."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            return a.to(dt), b.to(dt), dt
        return a, b, a.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        a, b, dt = self.factors(x.device.type)
        h = self.lora_dropout(x.to(dt)).reshape(-1, x.shape[-1]) @ a.t()
        # y + s·(h Bᵀ) in one fused op (addmm), instead of a matmul, a scale and an add
        out = torch.addmm(y.reshape(-1, y.shape[-1]).to(dt), h, b.t(), alpha=self.scaling)
        return out.view(*y.shape[:-1], -1).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s·B·A in float32 (out × in): what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def base_weight(self, dtype=torch.float32) -> torch.Tensor:
        if isinstance(self.base, QUANTIZED):
            return self.base.dequantize(dtype)
        w = self.base.weight.detach()
        return (w.t() if is_conv1d(self.base) else w).to(dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.use_rslora}"


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every LoRA layer of ``model`` computes its base alone, and trained embedding / head rows
    (``trainable.TrainableRows``) are their frozen originals (peft's ``disable_adapter``): every module with a
    ``disabled`` switch."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "disabled", None), bool)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def in_out(mod: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer: nn.Linear, Linear4bit, LoRALinear or Conv1D (weight in × out)."""
    return tuple(mod.weight.shape) if is_conv1d(mod) else (mod.in_features, mod.out_features)


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' GPT-2-style Conv1D: a linear layer with its weight stored in × out."""
    return type(mod).__name__ == "Conv1D" and getattr(mod, "weight", None) is not None


def is_plain_linear(mod: nn.Module) -> bool:
    """An ``nn.Linear`` that computes x·Wᵀ + b. A subclass with a forward of its own is tried on two rows of
    zeros (in eval mode, random state untouched): one returning something else — PhiMoE's router returns
    routing decisions — stays as it is, in the compute dtype; Falcon's plain ``FalconLinear`` passes."""
    if not isinstance(mod, nn.Linear):
        return False
    if type(mod).forward is nn.Linear.forward:
        return True
    was_training = mod.training
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            mod.train(False)
            y = mod(torch.zeros(2, mod.in_features, dtype=mod.weight.dtype, device=mod.weight.device))
        return isinstance(y, torch.Tensor) and tuple(y.shape) == (2, mod.out_features)
    except Exception:  # whatever it needs, it is not a plain linear layer
        return False
    finally:
        mod.train(was_training)


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer (float or 4-bit), LoRA-wrapped ones under their own name."""
    names = []
    for name, mod in model.named_modules():
        inner = re.search(r"\.(lora_A|lora_B)$", name) or name.endswith(".base")  # the parts of a LoRA layer
        if (is_plain_linear(mod) or isinstance(mod, QUANTIZED) or is_conv1d(mod)) and not inner:
            names.append(name)
    return names


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: the model's output embedding, or a linear called lm_head/embed_out/output."""
    heads = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for name, mod in model.named_modules():
        if out is not None and mod is out:
            heads.add(name)
    heads.update(n for n in linear_module_names(model) if n.split(".")[-1] in {"lm_head", "embed_out", "output"})
    return heads


def expert_layer_names(model: nn.Module) -> set[str]:
    """The linear layers inside mixture-of-experts experts (``experts.<e>.gate_up_proj`` and ``.down_proj``)."""
    return {f"{name}.{sub}" for name, mod in model.named_modules() if isinstance(mod, Experts)
            for sub, m in mod.named_modules() if isinstance(m, (nn.Linear, *QUANTIZED))}


def select_targets(model: nn.Module, target_modules: str | Iterable[str], r: int = 1,
                   missing: list | None = None) -> list[str]:
    """Resolve ``target_modules`` (see ``lora_options``): names (the last part(s) of a module path, as peft
    matches), a regex matched against the full path, or a keyword: ``"all-linear"`` (every linear layer but the
    head, the experts and what peft will not adapt in state-space mixers; in a vision-language model, its language
    model's — names and regexes reach the vision side), ``"all-linear+experts"``. Keywords leave
    out layers narrower than the rank ``r`` (Qwen-MoE's 1-wide shared-expert gate).

    Names: as peft, names that match no layer are fine while another one matches — they are appended to
    ``missing`` when it is given (else an error); no match at all is an error."""
    names = linear_module_names(model)
    heads = output_head_names(model)
    targets = target_names(target_modules)
    if targets is None:
        if target_modules in (ALL_LINEAR, ALL_LINEAR_EXPERTS):
            experts = set() if target_modules == ALL_LINEAR_EXPERTS else expert_layer_names(model)
            skip = experts | mixer_layer_names(model) | float_layer_names(model)  # a VLM: its language model's
            chosen = [n for n in names if n not in heads and n not in skip]
            fit = [n for n in chosen if min(in_out(model.get_submodule(n))) >= r]
            if chosen and not fit:
                widest = max(min(in_out(model.get_submodule(n))) for n in chosen)
                raise LowbitError(f"lora_r={r} is larger than every linear layer (the widest allows r ≤ {widest})")
            chosen = fit
        else:
            try:
                rx = re.compile(target_modules)
            except re.error as e:
                raise LowbitError(f"lora_target_modules: invalid regex {target_modules!r} ({e})") from None
            chosen = [n for n in names if rx.fullmatch(n)]
            if not chosen:
                raise LowbitError(f"lora_target_modules: regex {target_modules!r} matches no linear layer; "
                                  f"linear layers are named like: {', '.join(sorted(_short(names)))}")
        return chosen
    if not targets:
        raise LowbitError("lora_target_modules is empty")
    chosen, unknown = [], []
    for t in targets:
        hit = [n for n in names if n == t or n.endswith("." + t)]
        (chosen.extend(hit) if hit else unknown.append(t))
    refused = [n for n in chosen if n in mixer_layer_names(model)]
    if refused:
        raise LowbitError(f"lora_target_modules: {refused[0].rsplit('.', 1)[-1]!r} cannot carry LoRA in a "
                          f"{model.config.model_type} model (peft refuses it in state-space mixers); leave it out")
    if unknown and (missing is None or not chosen):
        raise LowbitError(f"lora_target_modules: no linear layer named {', '.join(map(repr, unknown))}; "
                          f"the model's linear layers are: {', '.join(sorted(_short(names)))}")
    if missing is not None:
        missing.extend(unknown)
    return sorted(set(chosen), key=names.index)


def mixer_layer_names(model: nn.Module) -> set[str]:
    """The linear layers peft refuses to adapt: in the state-space models of ``PEFT_REFUSED`` (Mamba mixers:
    Falcon-H1, Nemotron-H, …) every layer named ``out_proj`` or ``conv1d`` — peft checks the name, whichever block
    it sits in — so ``all-linear`` leaves them out and the adapter loads in peft."""
    types, names = PEFT_REFUSED
    if getattr(getattr(model, "config", None), "model_type", None) not in types:
        return set()
    return {n for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in names}


def _short(names: list[str]) -> set[str]:
    return {n.split(".")[-1] for n in names}


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
             target_modules: str | Iterable[str] = ALL_LINEAR, use_rslora: bool = False,
             init: str = "default", loftq_iters: int = 1, verbose: bool = True,
             source_weight: Callable[[str], torch.Tensor] | None = None, missing: list | None = None) -> list[str]:
    """Freeze ``model`` and wrap the chosen linear layers in ``LoRALinear``. Returns the wrapped names.

    ``init="loftq"`` needs ``source_weight``: layer name → its full-precision weight (e.g.
    ``lowbit.io.SourceWeights(model)``, which reads them from the checkpoint one at a time). ``missing``: collects
    listed names no layer has (see ``select_targets``).
    """
    if not isinstance(r, int) or r <= 0:
        raise LowbitError(f"lora_r must be a positive integer, got {r!r}")
    if init not in LORA_INITS:
        raise LowbitError(f"lora init must be one of {', '.join(LORA_INITS)}, got {init!r}")
    targets = select_targets(model, target_modules, r, missing)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent, _, child = name.rpartition(".")
        pmod = model.get_submodule(parent) if parent else model
        base = getattr(pmod, child)
        if isinstance(base, LoRALinear):
            raise LowbitError(f"{name} already has a LoRA adapter")
        lora = LoRALinear(base, r, alpha, dropout, use_rslora)
        lora.to(next((t.device for t in base.parameters()), torch.device("cpu")))
        if init == "loftq":
            loftq_init(lora, source_weight(name) if source_weight is not None else None, loftq_iters)
        setattr(pmod, child, lora)
    if verbose:
        trainable, total = count_parameters(model)
        print(f"LoRA r={r} alpha={alpha} on {len(targets)} layers: {trainable:,} trainable parameters "
              f"of {total:,} ({100 * trainable / total:.2f}%)")
    return targets


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) — total counts a 4-bit weight by its number of elements."""
    return parameter_counts(model)


def low_rank_factors(err: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the best rank-r approximation of ``err`` (truncated SVD, √σ on each side)."""
    u, sv, vh = torch.linalg.svd(err, full_matrices=False)
    root = sv[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root


@torch.no_grad()
def loftq_init(lora: LoRALinear, weight: torch.Tensor | None, iters: int = 1) -> None:
    """LoftQ-style start: W ≈ deq(Q) + s·B·A, from the layer's full-precision ``weight``. The first round keeps
    the base's own codes (round-to-nearest's, or a calibration's: ``io/calibration.py``); each further round
    re-quantizes W − s·B·A (same data type, blocksize and double quantization)."""
    base = lora.base
    if not isinstance(base, Linear4bit):
        raise LowbitError("loftq init is for 4-bit (and 3-/2-bit) layers; a full-precision or 8-bit base has little "
                          "error to absorb")
    if weight is None:
        raise LowbitError("loftq init needs the base's full-precision weights: add_lora(..., init='loftq', "
                          "source_weight=lowbit.io.SourceWeights(model))")
    q0 = base.weight
    w = weight.float()
    if tuple(w.shape) != tuple(q0.shape):
        raise LowbitError(f"loftq init: weight of shape {tuple(w.shape)} for a layer of shape {tuple(q0.shape)}")
    r, s = lora.r, lora.scaling
    residual_fit = torch.zeros_like(w)
    for i in range(max(1, iters)):
        q = q0 if i == 0 else quantize(w - residual_fit, q0.spec)
        a, b = low_rank_factors(w - q.dequantize(torch.float32), r)
        residual_fit = b @ a
    base.weight = q
    lora.lora_A.weight.copy_(a / math.sqrt(s))
    lora.lora_B.weight.copy_(b / math.sqrt(s))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors under peft's key names: ``base_model.model.<path>.lora_A.weight`` …, float32, whole
    (a sharded FSDP tensor is gathered: then every rank must call this)."""
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            for ab in ("lora_A", "lora_B"):
                w = whole(getattr(mod, ab).weight.detach())
                out[f"base_model.model.{name}.{ab}.weight"] = w.float().cpu().contiguous()
    return out
