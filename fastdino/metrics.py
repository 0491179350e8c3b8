"""Where training metrics go: a JSONL file (one row per log step) and TensorBoard scalars, rank 0 only."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends rows to `<output_dir>/log.jsonl` and mirrors the numbers to TensorBoard."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a declared dependency; keep training if it is absent
                self._writer = None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, row["step"])

    def drop_rows_after(self, step: int) -> None:
        """On resume, forget rows logged after the checkpoint's step: they are about to be trained again."""
        if not self.enabled or not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in rows))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
