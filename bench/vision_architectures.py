"""Which vision-language models lowbit takes end to end: a tiny random model of each, built from its transformers
config with a tiny processor made here (tests/tiny_vlm.py, nothing downloaded), through the whole path on an image
task. Prints the table, writes bench/results/vision_architectures.json and the README's table (``--readme``).

    python bench/vision_architectures.py [--arch qwen2_vl …] [--readme]

Columns (✓, or ✗ with the reason):
- load: every language-model matrix holds exactly the bytes bitsandbytes' ``quantize_4bit`` gives its checkpoint
  weight; the vision tower and projector stay float, equal to the checkpoint; the 4-bit model's logits on an
  image + text prompt equal transformers' own model holding the dequantized weights.
- train: ``lowbit.train`` on the built-in ``shapes`` task (a picture of a coloured shape → its description;
  LoRA on the language model) lowers the held-out loss.
- peft round trip: lowbit reloading the saved adapter, peft loading it onto transformers' model (same dequantized
  weights), and lowbit loading peft's re-save all give the trained model's logits on the image prompt.
- merge: transformers loads ``lowbit.merge``'s folder (its processor files beside it) and gives the trained
  model's logits on the image prompt.
- bnb-format save: transformers + bitsandbytes load ``save_quantized``'s folder with no missing or unexpected
  tensor, the vision side left in 16 bits (``llm_int8_skip_modules``), every bitsandbytes 4-bit layer holding
  lowbit's bytes, and its logits on the image prompt are lowbit's (< 1 %); lowbit reloads the folder to the same
  logits.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from architectures import _adapted, _bnb_quantize, _close, _logits, _quiet, _reference, _same_bits, check_peft
from tiny_vlm import VLM_ARCHITECTURES, save_tiny_vlm

from common import machine, update_readme, write_json

COLUMNS = ("load", "train", "peft round trip", "merge", "bnb-format save")


def prompt_inputs(src: Path) -> dict:
    """An image + text prompt as the model's processor makes it (a shapes picture)."""
    from lowbit.data.images import open_image
    from lowbit.data.shapes import shapes
    from lowbit.io.tokenizer import load_tokenizer

    proc = load_tokenizer(src).lowbit_processor
    rec = shapes(1)[0].data["messages"]
    image = open_image("base64:" + rec[0]["content"][0]["base64"], "shapes")
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                            {"type": "text", "text": "What?"}]}],
                                              tokenize=False, add_generation_prompt=True)
    return dict(proc(text=[text], images=[[image]], add_special_tokens=False, return_tensors="pt"))


def check_load(src: Path, inputs) -> str:
    from transformers import AutoModelForImageTextToText

    from lowbit.io.loader import SourceWeights, load
    from lowbit.nn.linear import Linear4bit
    from lowbit.nn.vision import language_model_prefix

    net = load(src, compute_dtype=torch.float32)
    lm = language_model_prefix(net)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, Linear4bit)}
    outside = [n for n in layers if not n.startswith(lm + ".")]
    if outside or not layers:
        raise AssertionError(f"4-bit layers outside the language model: {outside[:2]}")
    with SourceWeights(net) as source:
        for name, layer in layers.items():
            ref, deq = _bnb_quantize(source(name))
            mine = layer.weight.state_dict("weight")
            if set(mine) != set(ref) or not all(_same_bits(mine[k], v) for k, v in ref.items()):
                raise AssertionError(f"{name}: 4-bit state differs from bitsandbytes'")
            if not torch.equal(deq, layer.dequantize(torch.float32)):
                raise AssertionError(f"{name}: dequantizes to other values than bitsandbytes'")
    plain = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).state_dict()
    floats = {n: p for n, p in net.state_dict().items() if not n.startswith(lm + ".") and n in plain}
    if not all(torch.equal(p, plain[n]) for n, p in floats.items()):
        raise AssertionError("the vision tower / projector differ from the checkpoint")
    _close(_logits(net, inputs), _logits(_reference(src, net), inputs), "4-bit model vs transformers")
    return f"✓ {len(layers)} 4-bit matrices, {len(floats)} vision/projector tensors float"


def check_train(src: Path, out: Path, inputs) -> tuple[str, Path, torch.Tensor]:
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    cfg = TrainConfig(base_model=str(src), datasets="shapes", lora_r=8, lora_alpha=16, sequence_len=256,
                      micro_batch_size=8, max_steps=12, learning_rate=3e-3, warmup_steps=2, eval_steps=12,
                      save_steps=100, val_set_size=32, output_dir=str(out), compute_dtype="float32")
    with contextlib.redirect_stdout(io.StringIO()):
        res = train(cfg, progress=False, log=lambda *a: None, force=True)
    before, after = res["base_eval_loss"], res["eval_loss"]
    if not after < before:
        raise AssertionError(f"held-out loss did not go down ({before:.3f} → {after:.3f})")
    return f"✓ held-out {before:.2f} → {after:.2f}", Path(res["output_dir"]), _logits(res["model"], inputs)


def check_merge(src: Path, adapter: Path, inputs, want: torch.Tensor, tmp: Path) -> str:
    from transformers import AutoModelForImageTextToText

    from lowbit.io.merging import merge
    from lowbit.io.tokenizer import tokenizer_for

    merge(_adapted(src, adapter), tmp / "merged", dtype=torch.float32, tokenizer=tokenizer_for(src, adapter))
    _close(_logits(AutoModelForImageTextToText.from_pretrained(tmp / "merged"), inputs), want,
           "merged vs the trained model")
    _close(_logits(AutoModelForImageTextToText.from_pretrained(tmp / "merged"), prompt_inputs(tmp / "merged")),
           want, "merged, with its own processor, vs the trained model")
    return "✓"


def check_bnb_save(src: Path, inputs, tmp: Path) -> str:
    from transformers import AutoModelForImageTextToText

    from lowbit.io.export import save_quantized
    from lowbit.io.loader import load
    from lowbit.io.tokenizer import load_tokenizer
    from lowbit.nn.linear import Linear4bit

    net = load(src, compute_dtype=torch.float32)
    want = _logits(net, inputs)
    save_quantized(net, tmp / "bnb", tokenizer=load_tokenizer(src))
    bq, info = AutoModelForImageTextToText.from_pretrained(tmp / "bnb", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise AssertionError(f"transformers + bitsandbytes: {bad}")
    ours = {n: m for n, m in net.named_modules() if isinstance(m, Linear4bit)}
    theirs = {n: m for n, m in bq.named_modules() if type(m).__name__ == "Linear4bit"}
    if set(theirs) != set(ours):
        raise AssertionError(f"bitsandbytes' 4-bit layers differ from lowbit's: {sorted(set(theirs) ^ set(ours))[:2]}")
    for n, m in theirs.items():
        if not torch.equal(m.weight.data.view(-1), ours[n].codes.view(-1)):
            raise AssertionError(f"{n}: bitsandbytes holds other bytes than lowbit")
    with torch.no_grad():  # train mode: bitsandbytes' CPU inference kernel wants layers 32 rows wide and more
        got = bq.train()(**inputs).logits.float()
    rel = ((got - want).norm() / want.norm()).item()
    if not rel < 1e-2:
        raise AssertionError(f"bitsandbytes' logits differ from lowbit's by {100 * rel:.2f}%")
    _close(_logits(load(tmp / "bnb", compute_dtype=torch.float32), prompt_inputs(tmp / "bnb")), want,
           "lowbit reloading its export (with the folder's own processor)")
    return f"✓ {len(theirs)} bnb 4-bit layers, vision side 16-bit"


def check(arch: str, tmp: Path) -> dict:
    """One row of the table: each column ✓ (with what was measured) or ✗ and why."""
    from transformers import AutoConfig

    src = tmp / "model"
    save_tiny_vlm(src, arch)
    row = {"architecture": arch, "class": AutoConfig.from_pretrained(src).architectures[0]}
    t0 = time.perf_counter()
    adapter = want = None

    def column(name, fn):
        try:
            row[name] = fn()
        except Exception as e:  # a ✗ names the reason; the other columns still run
            row[name] = f"✗ {type(e).__name__}: {str(e).splitlines()[0][:160]}"

    inputs = prompt_inputs(src)
    column("load", lambda: check_load(src, inputs))

    def train_column():
        nonlocal adapter, want
        text, adapter, want = check_train(src, tmp / "run", inputs)
        return text

    column("train", train_column)
    for name, fn in (("peft round trip", lambda: check_peft(src, adapter, inputs, want, tmp)),
                     ("merge", lambda: check_merge(src, adapter, inputs, want, tmp))):
        column(name, fn if adapter is not None else lambda: (_ for _ in ()).throw(RuntimeError("no adapter")))
    column("bnb-format save", lambda: check_bnb_save(src, inputs, tmp))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown(results: list[dict]) -> str:
    lines = ["| model type | transformers class | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (2 + len(COLUMNS))]
    for r in results:
        lines.append(f"| {r['architecture']} | {r['class']} | " + " | ".join(r[c] for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", help="only these model types")
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    _quiet()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = []
    for arch in [a for a in VLM_ARCHITECTURES if not args.arch or a in args.arch]:
        with tempfile.TemporaryDirectory() as tmp:
            results.append(check(arch, Path(tmp)))
        print(f"{arch:12} " + "  ".join(results[-1][c][:1] for c in COLUMNS) + f"  {results[-1]['seconds']} s",
              flush=True)
    table = markdown(results)
    print(table)
    import transformers

    write_json("vision_architectures", {"machine": machine(), "transformers": transformers.__version__,
                                        "rows": results})
    if args.readme and not args.arch:
        update_readme("vision", table)
    return 0 if all(r[c].startswith("✓") for r in results for c in COLUMNS) else 1


if __name__ == "__main__":
    sys.exit(main())
