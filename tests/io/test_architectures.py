"""Every architecture of the README's table, end to end on a tiny random model of it: load (bitsandbytes' bytes,
transformers' logits), train (held-out loss down), peft round trip, merge, bitsandbytes-format save.
bench/architectures.py does the work and writes the table; this runs each of its rows."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import architectures  # noqa: E402


@pytest.mark.parametrize("arch,targets", architectures.rows())
def test_architecture_row(arch, targets, tmp_path):
    row = architectures.check(arch, targets, tmp_path)
    failed = {c: row[c] for c in architectures.COLUMNS if not row[c].startswith(("✓", "(as above"))}
    assert not failed, failed
    if targets == "all-linear+experts":
        assert "(16 in experts)" in row["load"] and "target_parameters" in row["peft round trip"]


def test_readme_table_has_every_row_and_no_cross():
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- arch:start -->")[1].split("<!-- arch:end -->")[0]
    for arch, targets in architectures.rows():
        line = next((ln for ln in table.splitlines() if re.match(rf"\| {arch} \| \w+ \| {re.escape(targets)} \|", ln)),
                    None)
        assert line is not None, (arch, targets)
        assert "✗" not in line, line
