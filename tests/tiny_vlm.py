"""Tiny random vision-language models built locally: a transformers config per model type, the tiny BPE tokenizer
with the model's image tokens added, and the model's own processor files (image processor sized for 28–64 px
images, a ChatML template that writes each image part as the model's placeholder). No download."""

import json
from pathlib import Path

import torch

from tiny import tiny_tokenizer

VLM_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "llava", "llava_next", "gemma3", "mllama",
                     "paligemma")
"""The image-text-to-text model types of the vision-language table (transformers model types)."""

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)

# model type → (special tokens added to the tokenizer, the placeholder an image part becomes in the template)
TOKENS = {
    "qwen2_vl": (["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"],
                 "<|vision_start|><|image_pad|><|vision_end|>"),
    "idefics3": (["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"], "<image>"),
    "llava": (["<image>"], "<image>"),
    "gemma3": (["<start_of_image>", "<image_soft_token>", "<end_of_image>", "<start_of_turn>", "<end_of_turn>"],
               "<start_of_image>"),
    "mllama": (["<|image|>"], "<|image|>"),
    "paligemma": (["<image>"], "<image>"),
}
FAMILY = {"qwen2_5_vl": "qwen2_vl", "qwen3_vl": "qwen2_vl", "llava_next": "llava"}


def vlm_template(placeholder: str, gemma: bool = False) -> str:
    """ChatML (Gemma's turns for Gemma 3: <start_of_turn>user / model … <end_of_turn>) where a message's content may
    be a list of parts; an image part is written as ``placeholder``."""
    start, end, answer = ("<start_of_turn>", "<end_of_turn>", "model") if gemma else \
        ("<|im_start|>", "<|im_end|>", "assistant")
    role = "('model' if m['role'] == 'assistant' else m['role'])" if gemma else "m['role']"
    return ("{% for m in messages %}{{ '" + start + "' + " + role + " + '\\n' }}"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}{{ '" + placeholder + "' }}{% else %}{{ p['text'] }}{% endif %}"
            "{% endfor %}{% endif %}{{ '" + end + "\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '" + start + answer + "\\n' }}{% endif %}")


def _tokenizer(arch):
    specials, placeholder = TOKENS[FAMILY.get(arch, arch)]
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    if arch == "paligemma":  # PaliGemma's processor adds its location and segmentation tokens: in the vocabulary
        from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

        tok.add_tokens(EXTRA_TOKENS)
    return tok, placeholder


NAMED = {"gemma3": {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                    "eoi_token": "<end_of_image>"},
         "qwen2_vl": {}}  # the Qwen-VL processors know their tokens
"""Named special tokens a processor reads from its tokenizer (``tokenizer.image_token``…), as tokenizer_config.json
carries them."""


def tiny_vlm_config(arch, tok):
    import transformers as tf

    ids = tok.convert_tokens_to_ids
    text = dict(TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id)
    if arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        text.update(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "rope_theta": 10000.0}, tie_word_embeddings=True)
        vision = dict(depth=2, hidden_size=32, embed_dim=32, num_heads=2, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, intermediate_size=64, mlp_ratio=2)
        if arch == "qwen2_vl":
            vision["hidden_size"] = 64
        else:
            vision["out_hidden_size"] = 64
        if arch == "qwen2_5_vl":
            vision.update(fullatt_block_indexes=[1], window_size=56)
        if arch == "qwen3_vl":
            vision.update(patch_size=16, num_position_embeddings=16, deepstack_visual_indexes=[0])
            text["rope_parameters"]["mrope_interleaved"] = True
        return tf.AutoConfig.for_model(arch, text_config=text, vision_config=vision,
                                       image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                                       vision_start_token_id=ids("<|vision_start|>"),
                                       vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    if arch == "idefics3":
        return tf.Idefics3Config(text_config=dict(text, model_type="llama"), image_token_id=ids("<image>"),
                                 vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, image_size=32, patch_size=8),
                                 scale_factor=2, tie_word_embeddings=True)
    clip = dict(model_type="clip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, image_size=28, patch_size=14, projection_dim=32)
    if arch in ("llava", "llava_next"):
        extra = {"image_grid_pinpoints": [[28, 56], [56, 28], [56, 56]]} if arch == "llava_next" else {}
        return tf.AutoConfig.for_model(arch, text_config=dict(text, model_type="llama"), vision_config=clip,
                                       image_token_id=ids("<image>"), vision_feature_layer=-1, **extra)
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8)
    if arch == "gemma3":
        return tf.Gemma3Config(text_config=dict(text, head_dim=16, sliding_window=16, model_type="gemma3_text",
                                                layer_types=["sliding_attention", "full_attention"]),
                               vision_config=siglip, mm_tokens_per_image=4, image_token_id=ids("<image_soft_token>"),
                               boi_token_id=ids("<start_of_image>"), eoi_token_id=ids("<end_of_image>"))
    if arch == "paligemma":
        return tf.PaliGemmaConfig(text_config=dict(text, head_dim=16, model_type="gemma"),
                                  vision_config=dict(siglip, image_size=28, patch_size=14, projection_dim=64),
                                  image_token_id=ids("<image>"), projection_dim=64, hidden_size=64)
    if arch == "mllama":
        return tf.MllamaConfig(
            text_config=dict(text, num_hidden_layers=3, cross_attention_layers=[1], model_type="mllama_text_model"),
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                               intermediate_size=64, vision_output_dim=64, image_size=28, patch_size=14,
                               max_num_tiles=2, intermediate_layers_indices=[0],
                               supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
            image_token_id=ids("<|image|>"))
    raise ValueError(arch)


PREPROCESSOR = {
    "qwen2_vl": dict(image_processor_type="Qwen2VLImageProcessor", min_pixels=28 * 28, max_pixels=56 * 56,
                     patch_size=14, merge_size=2, temporal_patch_size=2),
    "idefics3": dict(image_processor_type="Idefics3ImageProcessor", size={"longest_edge": 64},
                     max_image_size={"longest_edge": 32}, do_image_splitting=True),
    "llava": dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 28},
                  crop_size={"height": 28, "width": 28}),
    "llava_next": dict(image_processor_type="LlavaNextImageProcessor", size={"shortest_edge": 28},
                       crop_size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]),
    "gemma3": dict(image_processor_type="Gemma3ImageProcessor", size={"height": 32, "width": 32}),
    "paligemma": dict(image_processor_type="SiglipImageProcessor", size={"height": 28, "width": 28},
                      image_seq_length=4),
    "mllama": dict(image_processor_type="MllamaImageProcessor", size={"height": 28, "width": 28},
                   max_image_tiles=2),
}
PROCESSOR = {"idefics3": dict(image_seq_len=4), "llava": dict(patch_size=14, num_additional_image_tokens=1,
                                                              vision_feature_select_strategy="default"),
             "gemma3": dict(image_seq_length=4)}


def save_tiny_vlm(path, arch="qwen2_vl", seed=0):
    """A tiny random ``arch`` with its tokenizer and processor files in ``path``; returns (model, tokenizer)."""
    import transformers as tf
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    path = Path(path)
    tok, placeholder = _tokenizer(arch)
    config = tiny_vlm_config(arch, tok)
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():  # larger-than-init weights so the model's outputs are not ~uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tok.chat_template = vlm_template(placeholder, gemma=arch == "gemma3")
    tok.save_pretrained(path)
    named = NAMED.get(FAMILY.get(arch, arch), {"image_token": TOKENS[FAMILY.get(arch, arch)][0][0]})
    if named:
        tc = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**tc, "extra_special_tokens": named}))
    family = "llava_next" if arch == "llava_next" else FAMILY.get(arch, arch)
    pre = dict(PREPROCESSOR[family])
    if arch == "qwen3_vl":
        pre.update(patch_size=16, min_pixels=32 * 32, max_pixels=64 * 64)
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    proc = dict(PROCESSOR.get(FAMILY.get(arch, arch), {}), processor_class=PROCESSOR_MAPPING_NAMES[arch])
    (path / "processor_config.json").write_text(json.dumps(proc))
    (path / "chat_template.jinja").write_text(tok.chat_template)
    return model, tok
