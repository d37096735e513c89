"""A vision-language model in the planner: its language model is planned as a text model (``text_config``), with
the layer paths the loaded model has (``model.language_model.layers.0…``, Idefics3's ``model.text_model``), and
its vision tower and projector are float weights in the compute dtype. Image tokens are tokens of
``sequence_len`` like any other; how many one image takes is the model's processor's to say (``lowbit plan
--image-size WxH`` asks it: ``data/images.image_tokens``).

    vision parameters   counted from the checkpoint's safetensors headers when the model is a folder (exact);
                        for a config alone, estimated from ``vision_config``: per layer 4·h² + 2·h·i, the patch
                        and position embeddings, a two-layer projector to the language model's width

The vision tower runs frozen, outside autograd's saved tensors (nothing in it trains); its passing activations
are not counted.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["is_vision", "text_config", "vision_params", "layer_prefix"]

VISION_PARTS = ("visual", "vision", "multi_modal_projector", "connector", "image_newline")
TEXT_MODEL = {"idefics3": "model.text_model.", "smolvlm": "model.text_model."}


def is_vision(cfg: dict) -> bool:
    return isinstance(cfg.get("vision_config"), dict) and isinstance(cfg.get("text_config"), dict)


def text_config(cfg: dict) -> dict:
    """The language model's config, as a text model's config.json would hold it."""
    text = dict(cfg["text_config"])
    if "tie_word_embeddings" in cfg:  # the model's own setting (transformers ties by the outer config)
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return text


def layer_prefix(cfg: dict) -> str:
    """Where the language model's decoder layers are in the loaded model (``…layers.0.``'s parent)."""
    return TEXT_MODEL.get(cfg.get("model_type"), "model.language_model.")


def vision_params(model, cfg: dict) -> int:
    """Parameters of the vision tower and projector: from the checkpoint's headers, else estimated."""
    folder = Path(model) if isinstance(model, str) else None
    files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
    if files:
        total = 0
        for f in files:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            total += sum(math.prod(v["shape"]) for k, v in header.items()
                         if k != "__metadata__" and any(p in k for p in VISION_PARTS))
        return total
    v = cfg["vision_config"]
    h = v.get("embed_dim") or v.get("hidden_size")
    layers = (v.get("num_hidden_layers") or v.get("depth") or 0) + (v.get("num_global_layers") or 0)
    i = v.get("intermediate_size") or int(h * (v.get("mlp_ratio") or 4))
    p, side = v.get("patch_size") or 14, v.get("image_size") or 0
    text = cfg["text_config"].get("hidden_size") or h
    patches = 3 * p * p * h * (v.get("temporal_patch_size") or 1) + (side // p) ** 2 * h
    return layers * (4 * h * h + 2 * h * i) + patches + h * text + text * text  # + a two-layer projector
