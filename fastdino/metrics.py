"""Where training metrics go: a JSONL file (one row per log step) and TensorBoard scalars, rank 0 only.

A resumed run first forgets what was logged after its checkpoint (those steps are about to be trained again), so
each step appears once in `log.jsonl`, and TensorBoard hides the events after it (`purge_step`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastdino.checkpoint import temporary_path


class MetricsLogger:
    """Appends rows to `<output_dir>/log.jsonl` and mirrors the numbers to TensorBoard.

    resumed_at: the step the run continues from (0 for a fresh start), whose rows are the last ones kept.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "log.jsonl"
        self._writer = None
        if not enabled:
            return
        self._keep_rows_up_to(resumed_at)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=resumed_at + 1)
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

    def _keep_rows_up_to(self, step: int) -> None:
        """Drop rows after `step`, and a last row a kill cut short; replaced atomically, so a kill here loses
        nothing either."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the row being written when the run was killed
                continue
            if row["step"] <= step:
                kept.append(line)
        tmp = temporary_path(self.path)
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
