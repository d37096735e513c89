"""Which architectures lowbit takes end to end: a tiny random model of each, built from its transformers config
(tests/tiny.py, nothing downloaded), through the whole path. Prints the table, writes
bench/results/architectures.json and the README's table (``--readme``).

    python bench/architectures.py [--arch mixtral …] [--readme]

Columns (✓, or ✗ with the reason):
- load: every 4-bit matrix (experts' too) holds exactly the bytes bitsandbytes' ``quantize_4bit`` gives its
  checkpoint weight (GPT-2's Conv1D: of the transpose), and the 4-bit model's logits equal transformers' own
  model holding the dequantized weights (so: exactly bitsandbytes' rounding error, nothing else).
- train: ``lowbit.train`` (LoRA on the row's targets) lowers the held-out loss.
- peft round trip: lowbit reloading the saved adapter, peft loading it onto transformers' model (same
  dequantized weights), and lowbit loading peft's re-save of it all give the trained model's logits.
- merge: transformers loads ``lowbit.merge``'s folder and gives the trained model's logits.
- bnb-format save: transformers + bitsandbytes load ``save_quantized``'s folder with no missing or unexpected
  tensor, every bitsandbytes 4-bit layer holds lowbit's bytes, and its logits are lowbit's up to bitsandbytes'
  CPU kernel (relative difference < 1 %); lowbit reloads the folder to the same logits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import machine, update_readme, write_json
from tiny import ARCHITECTURES, MOE_ARCHITECTURES, save_tiny_with_tokenizer

COLUMNS = ("load", "train", "peft round trip", "merge", "bnb-format save")
ATOL = 1e-4  # float32 logits of the same weights computed two ways


INT8_ROW = "all-linear, 8-bit base"  # the row that stores the base as LLM.int8 (load_in_8bit) instead of NF4


def rows() -> list[tuple[str, str]]:
    """(architecture, LoRA targets): every architecture with all-linear; MoE also with every expert; LLaMA also on
    an 8-bit base."""
    out = [(a, "all-linear") for a in ARCHITECTURES]
    return out + [(a, "all-linear+experts") for a in MOE_ARCHITECTURES] + [("llama", INT8_ROW)]


def _quant(targets: str):
    from lowbit.quant.spec import QuantSpec

    return QuantSpec("int8", double_quant=False) if targets == INT8_ROW else QuantSpec()


def _quiet():
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    for name in ("transformers", "bitsandbytes", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _data(path: Path) -> Path:
    rows_ = [{"messages": [{"role": "user", "content": f"what is the capital of france {i % 4}"},
                           {"role": "assistant", "content": "the capital of france is paris"}]} for i in range(64)]
    path.write_text("\n".join(json.dumps(r) for r in rows_) + "\n")
    return path


def _logits(model, ids) -> torch.Tensor:
    """Logits of ``ids`` (a tensor of token ids, or a vision-language model's inputs as a dict)."""
    with torch.no_grad():
        return (model.eval()(**ids) if isinstance(ids, dict) else model.eval()(ids)).logits.float()


def auto_class(src: Path):
    """transformers' auto class for the model in ``src`` (image-text-to-text for a vision-language model)."""
    import transformers

    vision = "vision_config" in json.loads((Path(src) / "config.json").read_text())
    return transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
    err = (a - b).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"{what}: logits differ by {err:.2e} (max abs; allowed {atol:g})")


def _reference(src: Path, net, quant=None) -> torch.nn.Module:
    """transformers' own model of ``src`` holding ``net``'s weights dequantized (adapters left out)."""
    from lowbit.io.loader import load
    from lowbit.io.merging import dequantize_model

    ref = auto_class(src).from_pretrained(src, dtype=torch.float32)
    plain = dequantize_model(load(src, quant, compute_dtype=torch.float32) if quant else
                             load(src, compute_dtype=torch.float32))
    missing, unexpected = ref.load_state_dict(plain.state_dict(), strict=False)
    if missing or unexpected:
        raise AssertionError(f"dequantized model's tensors differ from transformers': missing {missing[:2]}, "
                             f"unexpected {unexpected[:2]}")
    return ref.eval()


def _bnb_quantize(w: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(bitsandbytes' state dict of w in NF4 + double quantization, its dequantization by bitsandbytes' own
    pure-PyTorch path — its CPU C kernel is wrong when a row is not whole blocks, see the README)."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, st = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    absmax = F.dequantize_blockwise(st.absmax, st.state2) + st.offset
    deq = _dequantize_4bit_compute.__wrapped__(packed.view(-1), absmax, st.code, 64, st.shape, torch.float32)
    return {"weight": packed, **{f"weight.{k}": v for k, v in st.as_dict(packed=True).items()}}, deq


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.is_floating_point()
                                                                     else a, b.view(torch.uint8)
                                                                     if b.is_floating_point() else b)


def check_load_int8(src: Path, ids) -> str:
    """Every 8-bit matrix holds bitsandbytes' Int8Params bytes (int8 codes and SCB) of its checkpoint weight."""
    import bitsandbytes as bnb

    from lowbit.io.loader import SourceWeights, load
    from lowbit.nn.linear8bit import Linear8bit

    quant = _quant(INT8_ROW)
    net = load(src, quant, compute_dtype=torch.float32)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, Linear8bit)}
    with SourceWeights(net) as source:
        for name, layer in layers.items():
            p = bnb.nn.Int8Params(source(name), requires_grad=False, has_fp16_weights=False)._quantize("cpu")
            if not (torch.equal(p.data, layer.codes) and torch.equal(p.SCB, layer.SCB)):
                raise AssertionError(f"{name}: 8-bit state differs from bitsandbytes'")
    _close(_logits(net, ids), _logits(_reference(src, net, quant), ids), "8-bit model vs transformers")
    return f"✓ {len(layers)} 8-bit matrices"


def check_load(src: Path, ids) -> str:
    from lowbit.io.loader import SourceWeights, load
    from lowbit.nn.linear import Linear4bit

    net = load(src, compute_dtype=torch.float32)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, Linear4bit)}
    with SourceWeights(net) as source:
        for name, layer in layers.items():
            ref, deq = _bnb_quantize(source(name))
            mine = layer.weight.state_dict("weight")
            if set(mine) != set(ref) or not all(_same_bits(mine[k], v) for k, v in ref.items()):
                raise AssertionError(f"{name}: 4-bit state differs from bitsandbytes'")
            if not torch.equal(deq, layer.dequantize(torch.float32)):
                raise AssertionError(f"{name}: dequantizes to other values than bitsandbytes'")
    _close(_logits(net, ids), _logits(_reference(src, net), ids), "4-bit model vs transformers")
    experts = sum(".experts." in n for n in layers)
    return f"✓ {len(layers)} 4-bit matrices" + (f" ({experts} in experts)" if experts else "")


def check_train(src: Path, data: Path, out: Path, targets: str, ids) -> tuple[str, Path, torch.Tensor]:
    """(column, adapter folder, the trained model's logits on ``ids``, as it is in memory)."""
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    int8 = targets == INT8_ROW
    cfg = TrainConfig(base_model=str(src), datasets=str(data), lora_r=4, lora_alpha=8,
                      lora_target_modules="all-linear" if int8 else targets, load_in_8bit=int8, load_in_4bit=not int8,
                      sequence_len=64, micro_batch_size=4, max_steps=12, learning_rate=3e-3, warmup_steps=2,
                      eval_steps=12, save_steps=100, val_set_size=0.125, output_dir=str(out), compute_dtype="float32")
    with contextlib.redirect_stdout(io.StringIO()):
        res = train(cfg, progress=False, log=lambda *a: None, force=True)
    before, after = res["base_eval_loss"], res["eval_loss"]
    if not after < before:
        raise AssertionError(f"held-out loss did not go down ({before:.3f} → {after:.3f})")
    return f"✓ held-out {before:.2f} → {after:.2f}", Path(res["output_dir"]), _logits(res["model"], ids)


def _adapted(src: Path, adapter: Path, quant=None):
    from lowbit.io.adapters import load_adapter
    from lowbit.io.loader import load

    return load_adapter(load(src, quant, compute_dtype=torch.float32) if quant else
                        load(src, compute_dtype=torch.float32), adapter)


def check_peft(src: Path, adapter: Path, ids, want: torch.Tensor, tmp: Path, quant=None) -> str:
    """``want``: the trained model's logits."""
    from peft import PeftModel

    net = _adapted(src, adapter, quant)
    _close(_logits(net, ids), want, "lowbit reloading its adapter vs the trained model")
    peft_model = PeftModel.from_pretrained(_reference(src, net, quant), adapter)
    _close(_logits(peft_model, ids), want, "peft on transformers vs the trained model")
    resaved = tmp / "peft-resaved"
    peft_model.save_pretrained(resaved)
    _close(_logits(_adapted(src, resaved, quant), ids), want, "lowbit on peft's re-save vs the trained model")
    kind = json.loads((adapter / "adapter_config.json").read_text())
    return "✓" + (" (experts as peft target_parameters)" if kind.get("target_parameters") else "")


def check_merge(src: Path, adapter: Path, ids, want: torch.Tensor, tmp: Path, quant=None) -> str:
    from transformers import AutoModelForCausalLM

    from lowbit.io.merging import merge

    merge(_adapted(src, adapter, quant), tmp / "merged", dtype=torch.float32)
    _close(_logits(AutoModelForCausalLM.from_pretrained(tmp / "merged"), ids), want, "merged vs the trained model")
    return "✓"


def check_bnb_save_int8(src: Path, ids, tmp: Path) -> str:
    """transformers + bitsandbytes load the 8-bit folder: every Linear8bitLt holds lowbit's int8 codes and SCB; its
    logits are lowbit's up to bitsandbytes' int8 matmul (activations quantized to int8 too: < 5 %)."""
    from transformers import AutoModelForCausalLM

    from lowbit.io.export import save_quantized
    from lowbit.io.loader import load
    from lowbit.nn.linear8bit import Linear8bit

    net = load(src, _quant(INT8_ROW), compute_dtype=torch.float32)
    want = _logits(net, ids)
    save_quantized(net, tmp / "bnb8")
    bq, info = AutoModelForCausalLM.from_pretrained(tmp / "bnb8", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise AssertionError(f"transformers + bitsandbytes: {bad}")
    ours = {n: m for n, m in net.named_modules() if isinstance(m, Linear8bit)}
    theirs = {n: m for n, m in bq.named_modules() if type(m).__name__ == "Linear8bitLt"}
    if set(theirs) != set(ours):
        raise AssertionError(f"8-bit layers differ: {sorted(set(theirs) ^ set(ours))[:2]}")
    for n, m in theirs.items():
        if not (torch.equal(m.weight.data, ours[n].codes) and torch.equal(m.weight.SCB, ours[n].SCB)):
            raise AssertionError(f"{n}: bitsandbytes holds other bytes than lowbit")
    rel = ((_logits(bq, ids) - want).norm() / want.norm()).item()
    if not rel < 5e-2:
        raise AssertionError(f"bitsandbytes' int8 logits differ from lowbit's by {100 * rel:.2f}%")
    _close(_logits(load(tmp / "bnb8", compute_dtype=torch.float32), ids), want, "lowbit reloading its export")
    return f"✓ {len(theirs)} bnb 8-bit layers (int8 matmul: logits {100 * rel:.1f} % apart)"


def check_bnb_save(src: Path, ids, tmp: Path) -> str:
    from transformers import AutoModelForCausalLM

    from lowbit.io.export import float_in_bitsandbytes, save_quantized
    from lowbit.io.loader import load
    from lowbit.nn.linear import Linear4bit

    net = load(src, compute_dtype=torch.float32)
    want = _logits(net, ids)
    save_quantized(net, tmp / "bnb")
    bq, info = AutoModelForCausalLM.from_pretrained(tmp / "bnb", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise AssertionError(f"transformers + bitsandbytes: {bad}")
    ours = {n: m for n, m in net.named_modules() if isinstance(m, Linear4bit)}
    theirs = {n: m for n, m in bq.named_modules() if type(m).__name__ == "Linear4bit"}
    if set(theirs) - set(ours):
        raise AssertionError(f"bitsandbytes quantized layers lowbit did not: {sorted(set(theirs) - set(ours))[:2]}")
    for n, m in theirs.items():
        if not torch.equal(m.weight.data.view(-1), ours[n].codes.view(-1)):
            raise AssertionError(f"{n}: bitsandbytes holds other bytes than lowbit")
    notes = []
    try:
        got = _logits(bq, ids)
    except AssertionError as e:  # bitsandbytes' CPU inference kernel (AVX512-BF16, eval mode, no autograd) packs
        if "divisible by block_n" not in str(e):  # weights in blocks of 32 output rows: narrower layers fail
            raise
        narrow = next(n for n, m in theirs.items() if m.out_features % 32)
        notes.append(f"bitsandbytes' CPU inference kernel fails on {narrow.rsplit('.', 1)[-1]} "
                     f"({theirs[narrow].out_features} wide): compared in train mode")
        bq = AutoModelForCausalLM.from_pretrained(tmp / "bnb")
        with torch.no_grad():
            got = bq.train()(ids).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    if not rel < 1e-2:
        raise AssertionError(f"bitsandbytes' logits differ from lowbit's by {100 * rel:.2f}%")
    floats = float_in_bitsandbytes(net)
    reloaded = _logits(load(tmp / "bnb", compute_dtype=torch.float32), ids)
    if floats:  # written dequantized; lowbit re-quantizes them on reload (double quantization is not idempotent)
        notes.append(f"{len(floats)} layers are nn.Linear subclasses, which transformers + bitsandbytes keep in "
                     "16 bits: written dequantized, reloaded within 1e-3")
        _close(reloaded, want, "lowbit reloading its export", atol=1e-3)
    else:
        _close(reloaded, want, "lowbit reloading its export")
    return f"✓ {len(theirs)} bnb 4-bit layers" + "".join(f" ({n})" for n in notes)


def check(arch: str, targets: str, tmp: Path) -> dict:
    """One row of the table: each column ✓ (with what was measured) or ✗ and why."""
    from transformers import AutoConfig

    src = tmp / "model"
    save_tiny_with_tokenizer(src, arch)
    ids = torch.randint(4, 200, (2, 12), generator=torch.Generator().manual_seed(1))
    row = {"architecture": arch, "class": AutoConfig.from_pretrained(src).architectures[0], "targets": targets}
    t0 = time.perf_counter()
    adapter = want = None

    def column(name, fn):
        try:
            row[name] = fn()
        except Exception as e:  # a ✗ names the reason; the other columns still run
            row[name] = f"✗ {type(e).__name__}: {str(e).splitlines()[0][:160]}"

    quant = _quant(targets) if targets == INT8_ROW else None
    column("load", lambda: check_load_int8(src, ids) if quant else check_load(src, ids))

    def train_column():
        nonlocal adapter, want
        text, adapter, want = check_train(src, _data(tmp / "data.jsonl"), tmp / "run", targets, ids)
        return text

    column("train", train_column)
    for name, fn in (("peft round trip", lambda: check_peft(src, adapter, ids, want, tmp, quant)),
                     ("merge", lambda: check_merge(src, adapter, ids, want, tmp, quant))):
        column(name, fn if adapter is not None else lambda: (_ for _ in ()).throw(RuntimeError("no adapter")))
    if targets == INT8_ROW:
        column("bnb-format save", lambda: check_bnb_save_int8(src, ids, tmp))
    elif targets == "all-linear":
        column("bnb-format save", lambda: check_bnb_save(src, ids, tmp))
    else:
        row["bnb-format save"] = "(as above: no adapter involved)"
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown(results: list[dict]) -> str:
    head = "| architecture | transformers class | LoRA targets | " + " | ".join(COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for r in results:
        lines.append(f"| {r['architecture']} | {r['class']} | {r['targets']} | "
                     + " | ".join(r[c] for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", help="only these architectures (transformers model types)")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    _quiet()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    chosen = [r for r in rows() if not args.arch or r[0] in args.arch]
    results = []
    for arch, targets in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(check(arch, targets, Path(tmp)))
        print(f"{arch:12} {targets:19} " + "  ".join(results[-1][c][:1] for c in COLUMNS)
              + f"  {results[-1]['seconds']} s", flush=True)
    table = markdown(results)
    print(table)
    import transformers

    write_json("architectures", {"machine": machine(), "transformers": transformers.__version__, "rows": results})
    if args.readme and not args.arch:
        update_readme("arch", table)
    return 0 if all(r[c].startswith("✓") or r[c].startswith("(") for r in results for c in COLUMNS) else 1


if __name__ == "__main__":
    sys.exit(main())
