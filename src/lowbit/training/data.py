"""A run's data: every source in ``datasets`` read and tokenized by its own format (cached), mixed, then batched —
padded or packed — and the held-out batches (from ``val_set_size``, a folder's valid file, or ``test_datasets``).

The config's data keys reach the formats through each source's options: ``excess_length_strategy``,
``min_sample_len``, ``default_system_message``, ``chat_template_kwargs`` (so the tokenization cache tells them
apart). ``dataset_exact_deduplication`` drops repeated samples; ``curriculum_sampling`` keeps file order.
"""

from __future__ import annotations

import dataclasses

from ..data.batching import Batches
from ..data.image_batches import ImageBatcher
from ..data.images import processor_of
from ..data.packing import PackedBatches
from ..data.preference_batches import PreferenceBatches
from ..data.prompt_batches import PromptBatches
from ..data.sources import DataSource, parse_sources
from ..data.table import deduplicate, source_tables
from ..errors import LowbitError
from .config import TrainConfig

__all__ = ["load_data", "load_preference_data", "load_prompt_data", "sources_of"]


def sources_of(cfg: TrainConfig, datasets) -> list[DataSource]:
    """``datasets`` (or ``test_datasets``) as sources carrying the config's data options."""
    extra = {k: v for k, v in (("excess_length_strategy", cfg.excess_length_strategy),
                               ("min_sample_len", cfg.min_sample_len),
                               ("default_system_message", cfg.default_system_message),
                               ("chat_template_kwargs", cfg.chat_template_kwargs),
                               ("max_prompt_len", cfg.max_prompt_len if cfg.rl else 0))
             if v and v != "truncate"}
    sources = parse_sources(datasets, cfg.dataset_format, custom=cfg.rl == "grpo")
    if cfg.rl and cfg.rl != "grpo":  # Axolotl's type: chat_template under rl is its chat_template.default
        sources = [dataclasses.replace(s, fmt="chat_template.default") if s.fmt == "chat" else s for s in sources]
    return [dataclasses.replace(s, fields={**s.fields, **extra}) for s in sources]


def _tables(cfg: TrainConfig, tok, kind: str = "sft"):
    """(what was read, train table, held-out table or None, dropped, duplicates removed): ``datasets`` split by
    ``val_set_size`` (or held out by ``test_datasets``), exact duplicates removed when asked."""
    split = 0 if cfg.test_datasets is not None else cfg.val_set_size
    learn_inputs = cfg.train_on_inputs and kind == "sft"
    data = source_tables(sources_of(cfg, cfg.datasets), tok, split, cfg.seed, cfg.sequence_len, learn_inputs,
                         cfg.dataset_processes, kind)
    train, valid, dropped = data.train, data.valid, data.dropped
    if cfg.test_datasets is not None:
        test = source_tables(sources_of(cfg, cfg.test_datasets), tok, 0, cfg.seed, cfg.sequence_len, learn_inputs,
                             cfg.dataset_processes, kind)
        valid, dropped = test.train, dropped + test.dropped
    duplicates = 0
    if cfg.dataset_exact_deduplication:
        n = len(train) + (len(valid) if valid else 0)
        train, valid = deduplicate(train), deduplicate(valid) if valid else None
        duplicates = n - len(train) - (len(valid) if valid else 0)
    return data, train, valid, dropped, duplicates


def load_data(cfg: TrainConfig, tok, log=print) -> tuple[Batches | PackedBatches, Batches | None]:
    """Train and held-out batches: every source in ``datasets`` read and tokenized by its own format (cached),
    mixed; with ``sample_packing`` the training samples share rows (held-out ones are evaluated one per row)."""
    data, train, valid, dropped, duplicates = _tables(cfg, tok)
    pad = tok.pad_token_id
    shuffle = not cfg.curriculum_sampling
    images = _image_batcher(tok, train, cfg.sample_packing)
    batches = PackedBatches(train, cfg.micro_batch_size, pad, cfg.sequence_len, cfg.seed, shuffle=shuffle) \
        if cfg.sample_packing else \
        Batches(train, cfg.micro_batch_size, pad, cfg.seed, cfg.group_by_length and shuffle,
                cfg.sequence_len if cfg.pad_to_sequence_len else None, shuffle=shuffle,
                multiple_of=cfg.pad_to_multiple_of, images=images)
    packed = f"; packed into {len(batches.rows)} rows of {cfg.sequence_len} " \
             f"({100 * train.real_tokens() / (len(batches.rows) * cfg.sequence_len):.0f}% full)" \
        if cfg.sample_packing else ""
    fmts = ", ".join(dict.fromkeys(data.formats))
    log(f"data: {len(train)} train / {len(valid) if valid else 0} valid samples ({fmts}); {data.truncated} "
        f"truncated to {cfg.sequence_len} tokens, {dropped} dropped"
        f"{' (nothing to learn, or outside the length limits)' if dropped else ''}"
        f"{f', {duplicates} duplicates removed' if duplicates else ''}{packed}")
    eval_mb = cfg.eval_batch_size or cfg.micro_batch_size
    return batches, Batches(valid, eval_mb, pad, cfg.seed, multiple_of=cfg.pad_to_multiple_of,
                            images=images) if valid else None


def _image_batcher(tok, train, packing: bool) -> ImageBatcher | None:
    """A vision-language model's batcher of images (None for a text model); packing is refused with images (a row
    of several samples would mix their images and positions)."""
    proc = processor_of(tok)
    if proc is None:
        return None
    if packing and any(len(train.row(k)["images"]) for k in range(len(train))):
        raise LowbitError("sample_packing: the data has images; packing is not done with images — set "
                          "sample_packing: false")
    return ImageBatcher(proc)


def load_preference_data(cfg: TrainConfig, tok, log=print) -> tuple[PreferenceBatches, PreferenceBatches | None]:
    """Train and held-out preference batches (``rl`` set): pairs, or KTO's examples (paired data unpaired)."""
    data, train, valid, dropped, duplicates = _tables(cfg, tok, "preference")
    kto = cfg.rl == "kto"
    shuffle = not cfg.curriculum_sampling

    def batches(table, mb, group):
        return PreferenceBatches(table, mb, tok.pad_token_id, cfg.sequence_len, cfg.seed, kto, group, shuffle,
                                 cfg.pad_to_multiple_of, pad_to=cfg.sequence_len if cfg.pad_to_sequence_len else None)

    out = batches(train, cfg.micro_batch_size, cfg.group_by_length and shuffle)
    held = batches(valid, cfg.eval_batch_size or cfg.micro_batch_size, False) if valid else None
    unit = "examples" if kto else "pairs"
    fmts = ", ".join(dict.fromkeys(data.formats))
    log(f"data: {len(out.samples)} train / {len(held.samples) if held else 0} valid {unit} ({fmts}); "
        f"{data.truncated} truncated to {cfg.sequence_len} tokens"
        f"{f' (prompts to their last {cfg.max_prompt_len})' if cfg.max_prompt_len else ''}, {dropped} dropped"
        f"{' (an empty completion, or a prompt that fills sequence_len)' if dropped else ''}"
        f"{f', {duplicates} duplicates removed' if duplicates else ''}")
    return out, held


def load_prompt_data(cfg: TrainConfig, tok, world_size: int = 1, log=print) -> tuple[PromptBatches,
                                                                                     PromptBatches | None]:
    """The prompts of an ``rl: grpo`` run, ``micro_batch_size × gradient_accumulation_steps × ranks /
    num_generations`` of them a step, and the held-out prompts (``eval_batch_size or micro_batch_size`` completions,
    whole groups, a batch)."""
    from .grpo_spec import grpo_spec_from

    data, train, valid, dropped, duplicates = _tables(cfg, tok, "prompt")
    g = grpo_spec_from(cfg).num_generations
    per_step = cfg.micro_batch_size * cfg.gradient_accumulation_steps * world_size // g
    log(f"data: {len(train)} train / {len(valid) if valid else 0} valid prompts, {per_step} a step; "
        f"{data.truncated} truncated{f' (to their last {cfg.max_prompt_len} tokens)' if cfg.max_prompt_len else ''}, "
        f"{dropped} dropped{' (a prompt that fills sequence_len)' if dropped else ''}"
        f"{f', {duplicates} duplicates removed' if duplicates else ''}")
    held = PromptBatches(valid, max(1, (cfg.eval_batch_size or cfg.micro_batch_size) // g), shuffle=False) \
        if valid else None
    return PromptBatches(train, per_step, cfg.seed, not cfg.curriculum_sampling), held
