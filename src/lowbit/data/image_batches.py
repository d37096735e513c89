"""A batch's images as a vision-language model reads them, beside its padded token ids.

    pixel inputs     the model's own image processor over the batch's images, one list per sample
                     (pixel_values, image_grid_thw, pixel_attention_mask, image_sizes, aspect ratios, …)
    per-token marks  token_type_ids / mm_token_type_ids: 1 where a token is an image token (Gemma 3, Qwen-VL);
                     PaliGemma's: 0 for the prompt before the first learned token (its prefix), 1 after
    cross-attention  Mllama: which images each token attends to (from the image tokens' places), per tile

Which keys a model takes is read once from its processor (a call on one blank image); their names go in the batch
as ``vision_keys`` so the loss passes exactly those to the model (``training/loss.py``).
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from .formats import IGNORE
from .images import image_token_id, open_image

__all__ = ["ImageBatcher"]

TEXT_KEYS = ("input_ids", "attention_mask", "labels")
CROSS = "cross_attention_mask"


def _after_prefix(labels: torch.Tensor) -> torch.Tensor:
    """PaliGemma's token types: 0 for the prefix (the prompt before the first learned token, read both ways), 1 from
    there on (causal) — so no learned token is seen before it is predicted."""
    learned = (labels != IGNORE).long()
    return (learned.cumsum(1) > 0).long()


class ImageBatcher:
    """``batcher(batch, images)``: adds the pixel inputs of ``images`` (per sample, table strings) to ``batch``."""

    def __init__(self, proc):
        from PIL import Image

        self.proc, self.image_id = proc, image_token_id(proc)
        text = proc.tokenizer.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}], tokenize=False)
        probe = proc(text=[text], images=[[Image.new("RGB", (64, 64))]], add_special_tokens=False,
                     return_tensors="pt")
        ids = probe["input_ids"]
        marks = {k: "image" if torch.equal(v, (ids == self.image_id).to(v.dtype)) else "prefix"
                 for k, v in probe.items() if k not in TEXT_KEYS and k != CROSS and torch.is_tensor(v)
                 and v.dim() == 2 and v.shape == ids.shape}
        if any(kind == "prefix" and probe[k].any() for k, kind in marks.items()):
            raise LowbitError(f"{type(proc).__name__}: its per-token {', '.join(marks)} mark neither image tokens nor "
                              "a prefix; lowbit cannot make them for its batches")
        self.marks = marks
        self.pixels = tuple(k for k in probe if k not in TEXT_KEYS and k not in marks and k != CROSS)
        self.cross = CROSS in probe

    def __call__(self, batch: dict, images: list[list[str]]) -> dict:
        ids = batch["input_ids"]
        for k, kind in self.marks.items():
            batch[k] = (ids == self.image_id).long() if kind == "image" else _after_prefix(batch["labels"])
        keys = list(self.marks)
        if any(images):
            pictures = [[open_image(ref, f"sample {i} of the batch") for ref in refs] for i, refs in enumerate(images)]
            out = self.proc.image_processor(images=pictures, return_tensors="pt")
            for k in self.pixels:
                if k in out:
                    batch[k] = out[k]
                    keys.append(k)
            if self.cross:
                batch[CROSS] = self._cross_attention(ids, out["num_tiles"])
                keys.append(CROSS)
        batch["vision_keys"] = tuple(keys)
        return batch

    def _cross_attention(self, ids: torch.Tensor, num_tiles) -> torch.Tensor:
        """Mllama's token → (image, tile) mask, as its processor builds it, for the padded batch."""
        from transformers.models.mllama.processing_mllama import (
            convert_sparse_cross_attention_mask_to_dense,
            get_cross_attention_token_mask,
        )

        sparse = [get_cross_attention_token_mask(row.tolist(), self.image_id) for row in ids]
        dense = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles,
                                                             self.proc.image_processor.max_image_tiles, ids.shape[1])
        return torch.from_numpy(dense)
