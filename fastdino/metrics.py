"""Where training metrics go: a JSONL file (one row per log step) and TensorBoard scalars, rank 0 only.

A resumed run first forgets what was logged after its checkpoint (those steps are about to be trained again), so
each step appears once in `log.jsonl`, and TensorBoard hides the events after it (`purge_step`).
"""
from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

from fastdino.checkpoint import write_text_atomic
from fastdino.run_folder import METRICS_LOG, TENSORBOARD


class MetricsLogger:
    """Appends rows to `<output_dir>/log.jsonl` and mirrors the numbers to TensorBoard.

    resumed_at: the step the run continues from (0 for a fresh start), whose rows are the last ones kept.
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resumed_at: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_LOG
        self._writer = None
        if not enabled:
            return
        self._keep_rows_up_to(resumed_at)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(Path(output_dir) / TENSORBOARD), purge_step=resumed_at + 1)
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
        """Drop rows after `step`, and a last row a kill cut short."""
        if self.path.is_file():
            _rewrite_rows(self.path, lambda row: row if row["step"] <= step else None)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _rewrite_rows(path: Path, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
    """Pass every row through `change` (None drops it; a row a kill cut short is dropped) and replace the file
    atomically, so a kill here loses nothing either."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = change(json.loads(line))
        except json.JSONDecodeError:  # the row being written when the run was killed
            continue
        if row is not None:
            rows.append(json.dumps(row))
    write_text_atomic("".join(row + "\n" for row in rows), path)


def add_to_row(output_dir: str | Path, step: int, values: dict[str, Any]) -> None:
    """Merge `values` into the row of `step` in `<output_dir>/log.jsonl` (e.g. the final evaluation into the last
    training step's row), so each step stays one row however often the evaluation is redone."""
    path = Path(output_dir) / METRICS_LOG
    if path.is_file():
        _rewrite_rows(path, lambda row: {**row, **values} if row["step"] == step else row)
