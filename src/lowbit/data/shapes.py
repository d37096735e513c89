"""A synthetic image task, generated offline (seeded): a coloured shape on a plain background → its description.

    image     64×64 PNG: a circle, square or triangle in one of six colours, small or large, at a random place,
              on a light grey background with a little noise
    user      [image] "What is in this picture?"
    answer    "A large red circle." (size, colour, shape)

36 kinds of picture; a model that ignores the image can only learn the answers' shared form, so the held-out loss
falls further only when the image is read. The images travel inside the records (``base64``), nothing on disk.
"""

from __future__ import annotations

import base64
import io
import random

from .records import Record

__all__ = ["shapes", "shape_image", "COLOURS", "SHAPES_QUESTION"]

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30),
           "purple": (140, 50, 170), "orange": (245, 140, 20)}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 14, "large": 26}
SHAPES_QUESTION = "What is in this picture?"


def shape_image(colour: str, kind: str, size: str, rng: random.Random, side: int = 64) -> bytes:
    """One picture as PNG bytes."""
    from PIL import Image, ImageDraw

    grey = rng.randrange(200, 245)
    img = Image.new("RGB", (side, side), (grey, grey, grey))
    px = img.load()
    for _ in range(side * 4):  # a little noise, so no two pictures are equal
        x, y = rng.randrange(side), rng.randrange(side)
        px[x, y] = tuple(max(0, min(255, c + rng.randrange(-30, 31))) for c in px[x, y])
    r = SIZES[size] // 2
    cx, cy = rng.randrange(r + 2, side - r - 2), rng.randrange(r + 2, side - r - 2)
    box, fill = (cx - r, cy - r, cx + r, cy + r), COLOURS[colour]
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def shapes(n: int = 360, seed: int = 0) -> list[Record]:
    """``n`` pictures with their descriptions as chat records (every kind equally often, seeded order)."""
    rng = random.Random(seed)
    kinds = [(c, k, s) for c in COLOURS for k in KINDS for s in SIZES]
    out = []
    for i in range(n):
        colour, kind, size = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        data = base64.b64encode(shape_image(colour, kind, size, rng)).decode()
        out.append(Record({"messages": [
            {"role": "user", "content": [{"type": "image", "base64": data},
                                         {"type": "text", "text": SHAPES_QUESTION}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"A {size} {colour} {kind}."}]}]},
            f"shapes:{i}"))
    rng.shuffle(out)
    return out
