"""A vision-language model's processor (image processor + tokenizer + chat template) from its folder.

transformers' ``AutoProcessor`` reads it; the Qwen-VL processors also want a video processor, which transformers
only builds with torchvision. lowbit reads images alone, so when that is what fails the processor is built
without one (its tokenizer, image processor, chat template and options read from the same files).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import LowbitError

__all__ = ["load_processor", "is_vision_config", "PROCESSOR_FILE", "PROCESSOR_FILES", "save_tokenizer_files"]

PROCESSOR_FILE = "preprocessor_config.json"  # the image processor's options: a folder with it has a processor
PROCESSOR_FILES = (PROCESSOR_FILE, "processor_config.json", "chat_template.jinja", "chat_template.json")


def is_vision_config(raw: dict) -> bool:
    """config.json of an image-text-to-text model (a vision tower beside the language model)."""
    return isinstance(raw.get("vision_config"), dict)


def load_processor(folder: str | Path):
    """The processor in ``folder`` (one line naming the folder when it cannot be read)."""
    from transformers import AutoProcessor

    folder = Path(folder)
    try:
        return AutoProcessor.from_pretrained(folder)
    except ImportError as e:
        if "Torchvision" not in str(e) or "Video" not in str(e):
            raise LowbitError(f"{folder}: its processor cannot be loaded ({str(e).strip().splitlines()[0]})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LowbitError(f"{folder}: no usable processor (preprocessor_config.json, tokenizer) — "
                          f"{str(e).strip().splitlines()[0]}") from None
    return _without_video(folder)


def _without_video(folder: Path):
    """The folder's processor class, built with its image processor and no video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    own = folder / "processor_config.json"  # the processor's own options (image_seq_len, …) and class
    options = json.loads(own.read_text()) if own.is_file() else {}
    cls_name = options.pop("processor_class", None) or \
        json.loads((folder / PROCESSOR_FILE).read_text()).get("processor_class")
    cls = getattr(transformers, cls_name or "", None)
    if cls is None:
        raise LowbitError(f"{folder}: unknown processor class {cls_name!r}")

    class ImagesOnly(cls):
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" and arg is None else super().check_argument_for_proper_class(
                name, arg)

    template = folder / "chat_template.jinja"
    if template.is_file():
        options["chat_template"] = template.read_text()
    elif (folder / "chat_template.json").is_file():
        options["chat_template"] = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    keep = {k: v for k, v in options.items() if not k.startswith("_") and k not in ("video_processor",)}
    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(folder),
                      tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None, **keep)


def save_tokenizer_files(tok, dest: str | Path) -> None:
    """``tok``'s files in ``dest``, and beside them the processor files of the vision-language model it was loaded
    with (none for a text model's tokenizer), so that the folder reads back as the same processor."""
    tok.save_pretrained(dest)
    if getattr(tok, "lowbit_processor", None) is None:
        return
    for name in PROCESSOR_FILES:
        src, dst = Path(tok.name_or_path) / name, Path(dest) / name
        if src.is_file() and not dst.exists():
            shutil.copyfile(src, dst)
