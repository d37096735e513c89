"""Every vision-language model of the README's table, end to end on a tiny random model of it with a tiny
processor: load (bitsandbytes' bytes for the language model, the vision side float, transformers' logits on an
image prompt), train on the shapes task (held-out loss down), peft round trip, merge.
bench/vision_architectures.py does the work and writes the table; this runs each of its rows."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import vision_architectures  # noqa: E402
from tiny_vlm import VLM_ARCHITECTURES  # noqa: E402


@pytest.mark.parametrize("arch", VLM_ARCHITECTURES)
def test_vision_row(arch, tmp_path):
    row = vision_architectures.check(arch, tmp_path)
    failed = {c: row[c] for c in vision_architectures.COLUMNS if not row[c].startswith("✓")}
    assert not failed, failed


def test_readme_table_has_every_row_and_no_cross():
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- vision:start -->")[1].split("<!-- vision:end -->")[0]
    for arch in VLM_ARCHITECTURES:
        line = next((ln for ln in table.splitlines() if re.match(rf"\| {arch} \| \w+ \|", ln)), None)
        assert line is not None, arch
        assert "✗" not in line, line
