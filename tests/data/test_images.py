"""Chat data with images for vision-language models: tokens and labels against the model's own processor, batches
against what the processor gives the model, and every bad input as one line."""

import base64
import json

import pytest
import torch
from PIL import Image
from tiny_vlm import VLM_ARCHITECTURES, save_tiny_vlm

from lowbit.data import IGNORE, Record, tokenize_records
from lowbit.data.batching import Batches
from lowbit.data.image_batches import ImageBatcher
from lowbit.data.images import image_token_id
from lowbit.data.sources import parse_sources
from lowbit.data.table import source_tables
from lowbit.errors import LowbitError
from lowbit.io.tokenizer import load_tokenizer

from tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """arch → (model folder, tokenizer with its processor), built once per module."""
    made = {}

    def get(arch):
        if arch not in made:
            path = tmp_path_factory.mktemp(arch) / "model"
            save_tiny_vlm(path, arch)
            made[arch] = path, load_tokenizer(path)
        return made[arch]

    return get


def _png(path, colour=(200, 30, 30), size=(60, 50)):
    Image.new("RGB", size, colour).save(path)
    return path


def _conversation(image_part, answer="a red box"):
    return {"messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [image_part, {"type": "text", "text": "what is it?"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                         {"role": "user", "content": [{"type": "text", "text": "and now?"}, image_part]},
                         {"role": "assistant", "content": "still a box"}]}


def _where(tmp_path):
    return f"{tmp_path / 'data.jsonl'}:1"


@pytest.mark.parametrize("arch", [a for a in VLM_ARCHITECTURES if a != "paligemma"])
def test_tokens_and_batch_are_what_the_processor_gives_the_model(arch, vlm, tmp_path):
    """ids = the processor's over the whole rendered conversation; learned = the answers' tokens (never an image
    token); the batch's image inputs = the processor's own. (PaliGemma's processor writes its prefix format per call
    — BOS after the images, a newline at the end — so there each user turn with images carries it: see below.)"""
    _, tok = vlm(arch)
    proc = tok.lowbit_processor
    img = _png(tmp_path / "red.png")
    rec = _conversation({"type": "image", "path": "red.png"})
    (ids, labels), = tokenize_records([Record(rec, _where(tmp_path))], tok, sequence_len=4096).samples
    msgs = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else [{"type": "image"} if p["type"] == "image" else p for p in m["content"]]} for m in rec["messages"]]
    text = tok.apply_chat_template(msgs, tokenize=False)
    picture = Image.open(img).convert("RGB")
    want = proc(text=[text], images=[[picture, picture]], add_special_tokens=False, return_tensors="pt")
    assert ids[:-1] == want["input_ids"][0].tolist() or ids == want["input_ids"][0].tolist()
    image_id = image_token_id(proc)
    assert ids.count(image_id) >= 2  # both images (Mllama: one token each; the others expand them)
    assert all(y == IGNORE for x, y in zip(ids, labels) if x == image_id)
    learned = tok.decode([y for y in labels if y != IGNORE])
    assert "a red box" in learned and "still a box" in learned and "what is it" not in learned

    batch = ImageBatcher(proc)(Batches([(ids, labels)], 1, tok.pad_token_id).batch([0]), [[str(img), str(img)]])
    n = len(want["input_ids"][0])
    for key in batch["vision_keys"]:
        got, ref = batch[key], want[key]
        if got.dim() >= 2 and got.shape[1] == len(ids) and ref.shape[1] == n:
            got = got[:, :n]  # per-token inputs: the sample's own tokens (ours may end with EOS)
        assert torch.equal(got.to(ref.dtype), ref) if not ref.is_floating_point() else torch.allclose(got, ref), key
    missing = {k for k in want if k not in ("input_ids", "attention_mask", "labels", "token_type_ids")} \
        - set(batch["vision_keys"])
    assert not missing, missing


def test_paligemma_turns_carry_its_prefix_format_and_the_answers_are_causal(vlm, tmp_path):
    _, tok = vlm("paligemma")
    _png(tmp_path / "red.png")
    (ids, labels), = tokenize_records([Record(_conversation({"type": "image", "path": "red.png"}),
                                              _where(tmp_path))], tok, sequence_len=4096).samples
    image, bos, newline = image_token_id(tok.lowbit_processor), tok.bos_token_id, tok("\n")["input_ids"][-1]
    for at in [i for i in range(1, len(ids)) if ids[i - 1] == image and ids[i] != image]:  # after each image block
        assert ids[at] == bos
        end = ids.index(tok.convert_tokens_to_ids("<|im_end|>"), at)
        assert ids[end + 1: end + 3] == [newline, newline]  # the turn's own newline, then the processor's
    batch = ImageBatcher(tok.lowbit_processor)(Batches([(ids, labels)], 1, tok.pad_token_id).batch([0]),
                                               [[str(tmp_path / "red.png")] * 2])
    types = batch["token_type_ids"][0].tolist()
    first = next(i for i, y in enumerate(labels) if y != IGNORE)
    assert types[:first] == [0] * first and set(types[first:]) == {1}


def test_base64_and_data_urls_read_like_files(vlm, tmp_path):
    _, tok = vlm("llava")
    raw = base64.b64encode(_png(tmp_path / "red.png").read_bytes()).decode()
    parts = [{"type": "image", "path": "red.png"}, {"type": "image", "base64": raw},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{raw}"}}]
    got = [tokenize_records([Record(_conversation(p), _where(tmp_path))], tok, sequence_len=4096).samples[0]
           for p in parts]
    assert got[0] == got[1] == got[2]


@pytest.mark.parametrize("part,message", [
    ({"type": "image", "path": "nope.png"},
     "data.jsonl:1: messages\\[1\\].content\\[0\\]: image .*nope.png not found"),
    ({"type": "image", "path": "bad.png"}, "data.jsonl:1: image .*bad.png cannot be read"),
    ({"type": "image", "url": "https://example.com/cat.png"}, "is a URL; lowbit downloads nothing"),
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "is a URL"),
    ({"type": "image"}, "needs 'path'"),
    ({"type": "video", "path": "v.mp4"}, "content\\[0\\]: a content part is"),
    ({"type": "image", "base64": "not base64!"}, "a base64 image cannot be read"),
])
def test_bad_images_are_one_line_naming_file_line_and_image(part, message, vlm, tmp_path):
    _, tok = vlm("qwen2_vl")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(LowbitError, match=message) as e:
        tokenize_records([Record(_conversation(part), _where(tmp_path))], tok, sequence_len=4096)
    assert "\n" not in str(e.value)


def test_images_in_answers_text_models_and_cut_images_are_refused(vlm, tmp_path):
    _, tok = vlm("qwen2_vl")
    _png(tmp_path / "red.png")
    rec = _conversation({"type": "image", "path": "red.png"})
    rec["messages"][2]["content"].append({"type": "image", "path": "red.png"})
    with pytest.raises(LowbitError, match="an image in a assistant turn, which is learned"):
        tokenize_records([Record(rec, _where(tmp_path))], tok, sequence_len=4096)
    with pytest.raises(LowbitError, match="needs string fields 'role' and 'content'$"):  # a text model: no parts
        tokenize_records([Record(_conversation({"type": "image", "path": "red.png"}), _where(tmp_path))],
                         tiny_tokenizer(), sequence_len=4096)
    ok = _conversation({"type": "image", "path": "red.png"})
    with pytest.raises(LowbitError, match="its image tokens go past sequence_len=12"):
        tokenize_records([Record(ok, _where(tmp_path))], tok, sequence_len=12)


def test_a_table_keeps_images_and_packing_is_refused(vlm, tmp_path):
    from lowbit.training.config import TrainConfig
    from lowbit.training.data import load_data

    src, tok = vlm("idefics3")
    _png(tmp_path / "red.png")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(_conversation({"type": "image", "path": "red.png"}, f"box {i}"))
                              for i in range(6)) + "\n")
    table = source_tables(parse_sources(str(data)), tok, val_set_size=0, sequence_len=4096).train
    assert table.row(0)["images"] == [str(tmp_path / "red.png")] * 2
    cfg = TrainConfig(base_model=str(src), datasets=str(data), sequence_len=4096, val_set_size=0, micro_batch_size=3)
    batches, _ = load_data(cfg, tok, log=lambda *a: None)
    batch = batches.batch(batches.order(0)[0])
    assert batch["pixel_values"].shape[:2] == (3, 10) and "pixel_values" in batch["vision_keys"]
    with pytest.raises(LowbitError, match="sample_packing: the data has images"):
        load_data(TrainConfig(**{**cfg.__dict__, "sample_packing": True}), tok, log=lambda *a: None)


def test_a_named_template_is_the_vision_models_own_and_refused_for_a_text_model(vlm):
    from lowbit.io.tokenizer import prepare_tokenizer

    _, tok = vlm("gemma3")
    own = tok.chat_template
    changes = prepare_tokenizer(tok, "gemma3")
    assert tok.chat_template == own and "the model's own for 'gemma3'" in changes.notes[0]
    with pytest.raises(LowbitError, match="'llava' is a format for images or audio: with a vision-language model"):
        prepare_tokenizer(tiny_tokenizer(), "llava")


def test_what_is_not_built_for_vision_models_says_so_in_one_line(vlm, tmp_path):
    """GGUF export, calibration and preference tuning / GRPO refuse a vision-language model by name."""
    from lowbit.io.calibration import calibrate
    from lowbit.io.gguf_arch import gguf_arch
    from lowbit.io.loader import load
    from lowbit.training.config import TrainConfig
    from lowbit.training.recipe import train

    src, _ = vlm("qwen2_vl")
    net = load(src)
    with pytest.raises(LowbitError, match="GGUF export: qwen2_vl is a vision-language model; llama.cpp reads"):
        gguf_arch(net.config)
    with pytest.raises(LowbitError, match="calibration \\(awq\\) is not built for vision-language models"):
        calibrate(net, [], "awq")
    cfg = TrainConfig(base_model=str(src), datasets="chatterbot-pairs", rl="dpo", output_dir=str(tmp_path / "o"))
    with pytest.raises(LowbitError, match="rl: dpo is not built for vision-language models yet"):
        train(cfg, progress=False, log=lambda *a: None)


def test_an_images_column_fills_the_image_parts_or_goes_first_in_the_first_user_turn(vlm, tmp_path):
    """Axolotl's and TRL's form (llava-instruct-mix-vsft): image parts without a source take the record's
    ``images`` in order; without image parts, the images go first in the first user turn."""
    import datasets

    _, tok = vlm("qwen2_vl")
    _png(tmp_path / "red.png")
    _png(tmp_path / "blue.png", (20, 20, 220))
    by_path = _conversation({"type": "image", "path": "red.png"})
    by_path["messages"][3]["content"][1] = {"type": "image", "path": "blue.png"}
    want = tokenize_records([Record(by_path, _where(tmp_path))], tok, sequence_len=4096).samples[0]
    column = _conversation({"type": "image"})
    column["images"] = ["red.png", "blue.png"]
    assert tokenize_records([Record(column, _where(tmp_path))], tok, sequence_len=4096).samples[0] == want

    bare = _conversation({"type": "text", "text": ""})
    bare["messages"][1]["content"] = [{"type": "text", "text": "what is it?"}]
    bare["images"] = ["red.png"]
    first = _conversation({"type": "image", "path": "red.png"})
    first["messages"][3]["content"] = [{"type": "text", "text": "and now?"}]
    first["messages"][1]["content"] = [{"type": "image", "path": "red.png"}, {"type": "text", "text": "what is it?"}]
    assert tokenize_records([Record(bare, _where(tmp_path))], tok, sequence_len=4096).samples == \
        tokenize_records([Record(first, _where(tmp_path))], tok, sequence_len=4096).samples

    extra = dict(column, images=["red.png", "blue.png", "red.png"])
    with pytest.raises(LowbitError, match="1 of the 3 images in 'images' have no image part"):
        tokenize_records([Record(extra, _where(tmp_path))], tok, sequence_len=4096)
    with pytest.raises(LowbitError, match="this record has images, and the model is not a vision-language model"):
        tokenize_records([Record(dict(_conversation({"type": "text", "text": "x"}), images=["red.png"]),
                                 _where(tmp_path))], tiny_tokenizer(), sequence_len=4096)

    # a Parquet file whose images are a datasets Image column (bytes inside the file)
    msgs = [dict(m, content=[{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else
                 [dict({"type": "image", "text": None}) if p["type"] == "image" else dict(p) for p in m["content"]])
            for m in column["messages"]]  # Arrow: every content a list of the same struct
    rows = {"messages": [msgs] * 4,
            "images": [[str(tmp_path / "red.png"), str(tmp_path / "blue.png")]] * 4}
    ds = datasets.Dataset.from_dict(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.to_parquet(str(tmp_path / "train.parquet"))
    table = source_tables(parse_sources(str(tmp_path / "train.parquet")), tok, val_set_size=0,
                          sequence_len=4096).train
    assert table[0] == want and all(ref.startswith("base64:") for ref in table.row(0)["images"])
