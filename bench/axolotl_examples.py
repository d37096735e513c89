"""Axolotl's own example configs through `lowbit train`, as a new user would run them.

    python bench/axolotl_examples.py --examples PATH/TO/axolotl/examples [--model smollm2-135m] [--readme]

Fetch Axolotl's repository first (its examples/ folder is the yardstick of what users write; nothing of it is
copied here). Every LoRA/QLoRA config of a decoder-only text model without `trust_remote_code` (no
processor/vision/audio; preference stages `rl:` included) is run with only these changes: `base_model` → the
built-in SmolLM2 (no hub here), each dataset's `path` → a local JSONL file in the entry's shape (generated here:
alpaca rows, chat messages under the entry's field and role names, completion text, preference pairs or KTO's
labelled examples), and, for the harness, `--max-steps 2` and a scratch `output_dir`.
Each run is a fresh process (a timeout of `--timeout` s). A config is

    trained   `lowbit train` exited 0 and wrote an adapter
    refused   one line naming the key (exit 2) — with the reason
    failed    anything else (a traceback, a crash, a timeout): a defect

Prints a table per config and the totals; writes bench/results/axolotl_examples.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import publish

ROWS = 200  # rows per local file: enough that train[:1%] keeps a training row beside a held-out one
VISION_WORDS = ("vision", "-vl", "vl-", "llava", "pixtral", "voxtral", "audio", "smolvlm", "internvl", "paddleocr",
                "qwen2-vl", "qwen2_5-vl", "glm46v", "orpheus")


AUDIO_WORDS = ("voxtral", "audio", "orpheus")


def selected(examples: Path, vision: bool = False) -> list[tuple[str, dict]]:
    """(relative path, config) of every LoRA/QLoRA text-model config without remote code (``vision``: of every
    image-text config instead — a processor_type or a vision model's name —, audio models aside)."""
    out = []
    for f in sorted(examples.rglob("*.y*ml")):
        try:
            d = yaml.safe_load(f.read_text())
        except yaml.YAMLError:
            continue
        rel = str(f.relative_to(examples))
        if not isinstance(d, dict) or d.get("adapter") not in ("lora", "qlora") or d.get("trust_remote_code"):
            continue
        is_vision = bool(d.get("processor_type")) or any(w in rel.lower() for w in VISION_WORDS)
        if is_vision == vision and not (vision and any(w in rel.lower() for w in AUDIO_WORDS)):
            out.append((rel, d))
    return out


# a vision config's base model (a part of its name) → the tiny vision-language model it trains on here
# (tests/tiny_vlm.py); families lowbit's table lacks train on the nearest one (named in the row)
VISION_FAMILIES = (("qwen2.5-vl", "qwen2_5_vl"), ("qwen2_5-vl", "qwen2_5_vl"), ("qwen2-vl", "qwen2_vl"),
                   ("qwen3-vl", "qwen3_vl"), ("qwen3.5", "qwen3_vl"), ("gemma", "gemma3"), ("llava", "llava"),
                   ("vision", "mllama"), ("smolvlm", "idefics3"), ("paligemma", "paligemma"))


def vision_model(cfg: dict, folder: Path) -> str:
    """A tiny random vision-language model of the config's family (else Qwen2-VL's), made once per family."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_vlm import save_tiny_vlm

    name = str(cfg.get("base_model", "")).lower()
    arch = next((a for key, a in VISION_FAMILIES if key in name), "qwen2_vl")
    if not (folder / arch / "config.json").exists():
        save_tiny_vlm(folder / arch, arch)
    return str(folder / arch)


def vision_record(entry: dict, i: int) -> dict:
    """Row ``i`` of a local image-text file in the shape of llava-instruct-mix-vsft (the examples' data set):
    messages with an image part and an ``images`` column naming the picture."""
    role, content, user, assistant = _speakers(entry)
    return {entry.get("field_messages", "messages"): [
        {role: user, content: [{"type": "image"}, {"type": "text", "text": f"what colour is picture {i}?"}]},
        {role: assistant, content: [{"type": "text", "text": ("red", "blue")[i % 2]}]}],
        "images": [f"{('red', 'blue')[i % 2]}.png"]}


def _speakers(entry: dict) -> tuple[str, str, str, str]:
    """(role key, content key, user name, assistant name) of an entry's chat messages."""
    m = entry.get("message_property_mappings") or {}
    role = m.get("role", entry.get("message_field_role", "role"))
    content = m.get("content", entry.get("message_field_content", "content"))
    roles = entry.get("roles") or {}
    first = lambda k, d: (roles.get(k) or [d])[0] if isinstance(roles.get(k), list) else roles.get(k, d)
    sharegpt = role == "from"
    return role, content, first("user", "human" if sharegpt else "user"), first("assistant",
                                                                                 "gpt" if sharegpt else "assistant")


def preference_record(entry: dict, i: int, rl: str) -> dict:
    """Row ``i`` of a preference file in the shape ``entry`` reads (Axolotl's DPO / KTO strategies' fields)."""
    q, a, bad = f"{i}+{i}?", f"{2 * i}", f"{3 * i + 1}"
    kind = str(entry.get("type") or "")
    if rl == "kto":
        return {"prompt": q, "completion": a if i % 2 else bad, "label": i % 2 == 1}
    if kind.endswith(("argilla", "argilla_chat")) or kind == "chat_template.argilla":
        return {"prompt": q, "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]}
    if kind.startswith("chat_template"):
        role, content, user, assistant = _speakers(entry)
        return {entry.get("field_messages", "messages"): [{role: user, content: q}],
                entry.get("field_chosen", "chosen"): {role: assistant, content: a},
                entry.get("field_rejected", "rejected"): {role: assistant, content: bad}}
    prompt_key = {"intel": "question", "icr": "input", "argilla": "instruction"}.get(kind.rsplit(".", 1)[-1], "prompt")
    return {prompt_key: q, "chosen": a, "rejected": bad}


def record(entry: dict, i: int, rl: str = "") -> dict:
    """Row ``i`` of a local file in the shape ``entry`` reads."""
    if rl:
        return preference_record(entry, i, rl)
    q, a = f"{i}+{i}?", f"{2 * i}"
    kind = str(entry.get("type") or "")
    if kind.startswith("alpaca") or kind in ("instruct",):
        return {entry.get("field_instruction", "instruction"): q, entry.get("field_input", "input"): "",
                entry.get("field_output", "output"): a}
    if kind in ("completion", "pretrain", "text"):
        return {entry.get("field", "text"): f"{q} {a}"}
    role, content, user, assistant = _speakers(entry)
    answer = {role: assistant, content: a}
    if entry.get("field_thinking"):
        answer[entry["field_thinking"]] = f"add {i} to itself"
    return {entry.get("field_messages", "conversations" if role == "from" else "messages"):
            [{role: user, content: q}, answer]}


def localize(cfg: dict, folder: Path, model: str, vision: bool = False) -> dict:
    """The config with only the model and the data paths changed (``vision``: image-text rows, their pictures
    beside them)."""
    cfg = dict(cfg, base_model=model)
    if vision:
        from PIL import Image

        for colour, rgb in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            Image.new("RGB", (48, 40), rgb).save(folder / f"{colour}.png")
    for key in ("datasets", "test_datasets"):
        entries = cfg.get(key)
        if not isinstance(entries, list):
            continue
        local = []
        for k, e in enumerate(entries):
            e = dict(e) if isinstance(e, dict) else {"path": e}
            path = folder / f"{key}-{k}.jsonl"
            rows = (vision_record(e, i) if vision else record(e, i, str(cfg.get("rl") or "")) for i in range(ROWS))
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            e["path"] = str(path)
            e.pop("data_files", None)  # the hub's file names inside the dataset repository
            if e.get("ds_type") not in (None, "json"):
                e["ds_type"] = "json"
            local.append(e)
        cfg[key] = local
    return cfg


def tiny_smollm2(folder: Path) -> str:
    """A small random LLaMA with SmolLM2's tokenizer and chat template (the built-in model's shape names, a fraction
    of its compute): ``--model tiny``."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lowbit.io.resolve import resolve_model

    src = resolve_model("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(f, folder / f.name)
    return str(folder)


def run_one(rel: str, cfg: dict, model: str, timeout: int, vision: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="lowbit-axolotl-") as tmp:
        folder = Path(tmp)
        path = folder / Path(rel).name
        path.write_text(yaml.safe_dump(localize(cfg, folder, model, vision), sort_keys=False))
        cmd = [sys.executable, "-m", "lowbit", "train", str(path), "--quiet", "--max-steps", "2",
               "--output-dir", str(folder / "out")]
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "offline"})
            rc, err, out = p.returncode, p.stderr, p.stdout
        except subprocess.TimeoutExpired:
            rc, err, out = -1, f"timeout after {timeout} s", ""
        secs = time.perf_counter() - t
        wrote = (folder / "out" / "adapter_model.safetensors").exists()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if rc == 0 and wrote:
        status, why = "trained", ""
    elif rc == 2 and last.startswith("error: ") and "Traceback" not in err:
        status, why = "refused", last[len("error: "):].replace(str(path), Path(rel).name)
    else:
        status, why = "failed", last or f"exit {rc}"
    notes = [ln for ln in out.splitlines() if ln.startswith("Axolotl keys")]
    return {"config": rel, "status": status, "reason": re.sub(r"/tmp/lowbit-axolotl-\w+/", "", why)[:300],
            "seconds": round(secs, 1), "axolotl_notes": notes}


# a refusal that only says the stand-in model lacks the config's layers (its targets name another family's layers)
MISMATCH = re.compile(r"lora_target_modules: no linear layer named|lora_target_parameters: no expert parameter")
# the family of a config's base model, for a tiny random model of it (tests/tiny.py) when the stand-in lacks its layers
FAMILIES = (("pythia", "gpt_neox"), ("cerebras", "gpt2"), ("gpt2", "gpt2"), ("Qwen3", "qwen3_moe"),
            ("DeepSeek", "qwen3_moe"), ("MiniMax", "qwen3_moe"), ("GLM", "qwen3_moe"))


def family_model(cfg: dict, folder: Path) -> str | None:
    """A tiny random model of the config's family (the names its targets use), or None when none is known."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_tiny_with_tokenizer

    arch = next((a for key, a in FAMILIES if key.lower() in str(cfg.get("base_model", "")).lower()), None)
    if arch is None:
        return None
    save_tiny_with_tokenizer(folder / arch, arch)
    return str(folder / arch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", required=True, type=Path, help="Axolotl's examples/ folder")
    ap.add_argument("--model", default="smollm2-135m", help="the base every config trains (tiny: a small random "
                    "LLaMA with SmolLM2's tokenizer — the same names, a fraction of the compute)")
    ap.add_argument("--only", default="", help="a regex over the configs' paths")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--merge", action="store_true", help="replace only the rows of the configs run (--only) in the "
                    "saved bench/results/axolotl_examples.json, keep the others, and publish the whole table")
    ap.add_argument("--vision", action="store_true", help="the image-text configs instead, each on a tiny "
                    "vision-language model of its family (bench/results/axolotl_vision_examples.json)")
    args = ap.parse_args()
    if args.vision:
        return vision_main(args)
    configs = [(r, c) for r, c in selected(args.examples) if re.search(args.only, r)]
    if args.model == "tiny":
        args.model = tiny_smollm2(Path(tempfile.mkdtemp(prefix="lowbit-tiny-smollm2-")))
    rows = []
    families = Path(tempfile.mkdtemp(prefix="lowbit-families-"))
    for rel, cfg in configs:
        rows.append(run_one(rel, cfg, args.model, args.timeout))
        r = rows[-1]
        if r["status"] == "refused" and MISMATCH.search(r["reason"]):
            own = family_model(cfg, families)
            if own is not None:  # the stand-in lacked the layers: the config on a tiny model of its own family
                again = run_one(rel, cfg, own, args.timeout)
                r["own_family"] = f"{again['status']} on a tiny {Path(own).name}" + \
                    (f": {again['reason']}" if again["reason"] else "")
        print(f"{r['status']:8s} {r['seconds']:6.1f}s  {rel}  {r['reason']}  {r.get('own_family', '')}", flush=True)
    if args.merge:
        saved = json.loads((Path(__file__).parent / "results" / "axolotl_examples.json").read_text())["rows"]
        done = {r["config"]: r for r in rows}
        rows = sorted([done.pop(r["config"], r) for r in saved] + list(done.values()), key=lambda r: r["config"])
    counts = {s: sum(r["status"] == s for r in rows) for s in ("trained", "refused", "failed")}
    lines = ["| config | result | reason | on a tiny model of its own family |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['status']} | {r['reason'].replace('|', '/')} | {r.get('own_family', '')} |"
              for r in rows]
    total = max(1, len(rows))
    own = sum(r.get("own_family", "").startswith("trained") for r in rows)
    summary = (f"{len(rows)} configs: {counts['trained']} trained ({100 * counts['trained'] / total:.0f} %), "
               f"{counts['refused']} refused in one line, {counts['failed']} failed; of the refused, {own} name "
               f"layers the stand-in lacks and train on a tiny model of their own family "
               f"({100 * (counts['trained'] + own) / total:.0f} % train)")
    publish("axolotl_examples", summary + "\n\n" + "\n".join(lines),
            {"model": args.model, "counts": counts, "rows": rows}, args.readme)


def vision_main(args) -> None:
    """Every image-text config on a tiny model of its family, with image-text rows (llava-instruct-mix-vsft's
    shape) written here."""
    models = Path(tempfile.mkdtemp(prefix="lowbit-vlm-families-"))
    rows = []
    for rel, cfg in selected(args.examples, vision=True):
        if not re.search(args.only, rel):
            continue
        model = vision_model(cfg, models)
        rows.append(dict(run_one(rel, cfg, model, args.timeout, vision=True), stand_in=Path(model).name))
        r = rows[-1]
        print(f"{r['status']:8s} {r['seconds']:6.1f}s  {rel} ({r['stand_in']})  {r['reason']}", flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("trained", "refused", "failed")}
    lines = ["| config | trained on a tiny | result | reason |", "|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['stand_in']} | {r['status']} | {r['reason'].replace('|', '/')} |"
              for r in rows]
    summary = (f"{len(rows)} image-text configs: {counts['trained']} trained, {counts['refused']} refused in one "
               f"line, {counts['failed']} failed")
    publish("axolotl_vision_examples", summary + "\n\n" + "\n".join(lines), {"counts": counts, "rows": rows},
            args.readme)


if __name__ == "__main__":
    main()
