"""Images in chat data, for vision-language models: the message parts that carry them, reading them, and the
token ids of a piece of text with its images (the model's processor expands each image placeholder).

    {"role": "user", "content": [{"type": "image", "path": "cat.png"},      a file, relative to the data file
                                 {"type": "image", "base64": "iVBO…"},      the bytes (or a data: URL)
                                 {"type": "text", "text": "What is this?"}]}

``url`` / ``image_url`` parts with an http(s) address are refused (nothing is downloaded); ``image`` may hold a
path or a decoded image. As Axolotl and TRL read them, a record's ``images`` (or ``image``) column fills the image
parts that carry no image of their own, in order; with no such parts, its images go first in the first user turn.

In the token tables an image is a string: an absolute path, or ``base64:`` and the bytes. The images are read once
when the data is tokenized (the processor needs their sizes) and again, by ``data/image_batches.py``, when a batch
is made. Importing this module does not import torch or Pillow.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from ..errors import LowbitError

__all__ = ["content_parts", "image_column", "open_image", "processor_of", "image_token_id", "piece_ids", "data_dir",
           "image_tokens"]

BASE64 = "base64:"


def processor_of(tok):
    """The vision-language processor a tokenizer was loaded with (``io/tokenizer.load_tokenizer``), or None."""
    return getattr(tok, "lowbit_processor", None)


def image_token_id(proc) -> int:
    """The id of the token each image's features replace (Gemma 3's processor calls its placeholder, the start of
    image token, ``image_token``; its ``image_token_ids`` name the soft tokens the features go to)."""
    for tid in [*(getattr(proc, "image_token_ids", None) or []), getattr(proc, "image_token_id", None)]:
        if isinstance(tid, int):
            return tid
    return proc.tokenizer.convert_tokens_to_ids(proc.image_token)


def image_tokens(proc, width: int, height: int) -> int:
    """How many image tokens (``image_token_id``) the processor ``proc`` writes for one ``width``×``height`` image:
    the sequence tokens it takes beside the few markers its chat template writes around it (Mllama's images reach
    the text through cross-attention: one token each)."""
    from PIL import Image

    placeholder = getattr(proc, "image_token", None) or "<image>"
    out = proc(text=[placeholder], images=[[Image.new("RGB", (width, height))]], add_special_tokens=False)
    ids, image = out["input_ids"][0], image_token_id(proc)
    return sum(1 for t in (ids.tolist() if hasattr(ids, "tolist") else ids) if t == image)


def data_dir(rec) -> Path:
    """The folder of the file a record was read from (relative image paths start there)."""
    path = getattr(rec.where, "path", None)
    if path is None:  # "file:line" or "file[index]"
        text = str(rec.where)
        path = text.rsplit("[", 1)[0] if text.endswith("]") else text.rsplit(":", 1)[0]
    return Path(path).resolve().parent


def _source(value, where: str, base: Path) -> str:
    """One image as a table string: a path (relative to the data file), a data: URL, the bytes as a ``datasets``
    Image column holds them (``{"bytes", "path"}``), or a decoded image (Pillow)."""
    if isinstance(value, dict) and value.get("bytes"):
        return BASE64 + base64.b64encode(value["bytes"]).decode()
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image (a decoded Image column)
        out = io.BytesIO()
        value.save(out, format="PNG")
        return BASE64 + base64.b64encode(out.getvalue()).decode()
    if not isinstance(value, str) or not value:
        raise LowbitError(f"{where}: an image part needs 'path' (a file) or 'base64' (the bytes)")
    if value.startswith("data:"):
        return BASE64 + value.split(",", 1)[-1]
    if "://" in value:
        raise LowbitError(f"{where}: image {value!r} is a URL; lowbit downloads nothing — save the image and give "
                          "its file as 'path'")
    full = (base / value).resolve()
    if not full.is_file():
        raise LowbitError(f"{where}: image {full} not found")
    return str(full)


def _image_ref(part: dict, where: str, base: Path, column) -> str:
    """The image of an image part: its own source, else the next one of the record's ``images`` column."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return _source(url.get("url") if isinstance(url, dict) else url, where, base)
    if isinstance(part.get("base64"), str):
        data = part["base64"]
        return BASE64 + (data.split(",", 1)[-1] if data.startswith("data:") else data)
    for key in ("url", "path", "image"):
        if part.get(key) is not None:
            return _source(part[key], where, base)
    nxt = next(column, None)
    if nxt is None:
        raise LowbitError(f"{where}: an image part needs 'path' (a file) or 'base64' (the bytes), or the record an "
                          "'images' column holding its image")
    return _source(nxt, where, base)


def image_column(rec) -> list:
    """The record's ``images`` (or ``image``) column as a list (Axolotl's and TRL's form: the image parts of the
    messages say where each one goes)."""
    value = rec.data.get("images", rec.data.get("image"))
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def content_parts(content: list, where: str, base: Path, column=None) -> tuple[list[dict], list[str]]:
    """(the parts as chat templates read them — ``{"type": "text", "text"}`` / ``{"type": "image"}`` —, the images
    in order as table strings) of a message's list content; image parts without a source of their own take the
    next image of ``column`` (an iterator over the record's ``images``)."""
    parts, images, column = [], [], column if column is not None else iter(())
    for k, part in enumerate(content):
        at = f"{where}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in ("image", "image_url"):
            images.append(_image_ref(part, at, base, column))
            parts.append({"type": "image"})
        else:
            raise LowbitError(f"{at}: a content part is {{'type': 'text', 'text': ...}} or {{'type': 'image', "
                              f"'path' | 'base64': ...}}, got {str(part)[:80]}")
    return parts, images


def _name(ref: str) -> str:
    return "a base64 image" if ref.startswith(BASE64) else ref


def open_image(ref: str, where: str):
    """The image ``ref`` (a table string) as an RGB ``PIL.Image``; one line naming it when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        if ref.startswith(BASE64):
            img = Image.open(io.BytesIO(base64.b64decode(ref[len(BASE64):], validate=False)))
        else:
            if not Path(ref).is_file():
                raise LowbitError(f"{where}: image {ref} not found")
            img = Image.open(ref)
        img.load()
        return img.convert("RGB")
    except LowbitError:
        raise
    except (OSError, UnidentifiedImageError, binascii.Error, ValueError) as e:
        raise LowbitError(f"{where}: image {_name(ref)} cannot be read ({str(e).splitlines()[0][:120]})") from None


def piece_ids(tok, text: str, images: list[str], where: str) -> list[int]:
    """Token ids of ``text``; with images (only a vision-language model's data has them: ``formats._messages``),
    through the model's processor, which writes each image's tokens where the chat template put its placeholder."""
    if not images:
        return tok(text, add_special_tokens=False)["input_ids"]
    proc = processor_of(tok)
    pictures = [open_image(ref, where) for ref in images]
    try:
        out = proc(text=[text], images=[pictures], add_special_tokens=False)
    except (ValueError, TypeError) as e:
        raise LowbitError(f"{where}: the processor refused this turn's {len(images)} image(s) "
                          f"({str(e).strip().splitlines()[0][:200]}); does the chat template write a placeholder "
                          "for each image part?") from None
    ids = out["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)
