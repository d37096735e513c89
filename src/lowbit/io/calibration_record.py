"""What a calibrated 4-bit checkpoint remembers of its making, so that the float weights it was rounded from can
be found again (LoftQ init on a calibrated base needs them).

    config.json                  "lowbit_calibration": {"method": "awq", "source": "/path/of/the/float/model"}
    calibration.safetensors      rows.<layer> / cols.<layer>: float32 scale vectors (AWQ's; none for GPTQ)

The float weight of layer L is then  diag(1/rows.L) · W_source(L) · diag(cols.L)  (``Scaled`` in awq_fold.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["CalibrationRecord", "RECORD_FILE", "CONFIG_KEY", "scaled_weight"]

RECORD_FILE = "calibration.safetensors"
CONFIG_KEY = "lowbit_calibration"


def scaled_weight(w: torch.Tensor, name: str, rows: dict, cols: dict) -> torch.Tensor:
    """diag(1/rows[name]) · w · diag(cols[name]) (each factor only where given)."""
    if name in cols:
        w = w * cols[name]
    if name in rows:
        w = w / rows[name][:, None]
    return w


@dataclass
class CalibrationRecord:
    method: str
    source: str                                             # the float checkpoint's folder
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    cols: dict[str, torch.Tensor] = field(default_factory=dict)

    def config_entry(self) -> dict:
        return {"method": self.method, "source": self.source}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"rows.{k}": v.float().contiguous() for k, v in self.rows.items()}
        tensors.update({f"cols.{k}": v.float().contiguous() for k, v in self.cols.items()})
        save_file(tensors, str(folder / RECORD_FILE), metadata={"method": self.method})

    @classmethod
    def read(cls, folder: Path, entry: dict) -> CalibrationRecord:
        from safetensors.torch import load_file

        rec = cls(str(entry.get("method")), str(entry.get("source")))
        path = folder / RECORD_FILE
        if path.exists():
            for k, v in load_file(str(path)).items():
                kind, _, name = k.partition(".")
                (rec.rows if kind == "rows" else rec.cols)[name] = v
        return rec
