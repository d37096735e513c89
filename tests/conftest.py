"""Shared fixtures: the bitsandbytes reference, a tiny random LLaMA, a tiny training workspace.

Tests mirror the package (tests/quant/ ↔ src/lowbit/quant/, …); the tiny models are built from transformers
configs and saved locally (tiny.py), so nothing is downloaded. Every random draw is seeded.
"""

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in Triton's interpreter on CPU tensors (before Triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the `datasets` library's Arrow caches of the tests' little files go to a folder removed at exit (before it loads)
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="lowbit-test-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

from tiny import save_tiny, save_tiny_with_tokenizer

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bnbF():
    """bitsandbytes.functional: the reference we must match byte for byte (CPU build)."""
    import bitsandbytes.functional as F

    return F


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(folder, reference transformers model in eval mode) of a tiny random LLaMA saved as safetensors."""
    path = tmp_path_factory.mktemp("tiny-llama")
    ref = save_tiny(path, "llama")
    return path, ref.eval()


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """(root, model folder with a ChatML tokenizer, chat data file of 48 dialogues) for training runs."""
    root = tmp_path_factory.mktemp("wf")
    model_dir = root / "model"
    save_tiny_with_tokenizer(model_dir)
    data = root / "data.jsonl"
    rows = []
    for i in range(48):
        rows.append({"messages": [{"role": "user", "content": f"what is the capital of france {i % 3}"},
                                  {"role": "assistant", "content": "the capital of france is paris"}]})
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, model_dir, data
