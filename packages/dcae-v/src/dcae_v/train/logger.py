"""Training metrics to JSONL and CSV (always), TensorBoard (when installed) and a tqdm bar."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("dcae_v.train")


class MetricsLogger:
    """Appends one row per logged step; only the process that owns it (rank 0) writes."""

    def __init__(self, out_dir: Path, columns: list[str], tensorboard: bool, enabled: bool = True):
        self.enabled, self.columns = enabled, ["step", *columns]
        self.jsonl, self.csv = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if not self.csv.exists():
            with self.csv.open("w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        if tensorboard:
            try:
                from torch.utils.tensorboard import (
                    SummaryWriter,  # needs the optional tensorboard package
                )
            except ImportError:
                log.info("tensorboard is not installed; metrics go to %s and %s only", self.jsonl, self.csv)
            else:
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self.columns])
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run repeats those steps)."""
    jsonl, table = out_dir / "metrics.jsonl", out_dir / "metrics.csv"
    if jsonl.exists():
        keep = [ln for ln in jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        jsonl.write_text("".join(ln + "\n" for ln in keep))
    if table.exists():
        with table.open(newline="") as f:
            rows = list(csv.reader(f))
        with table.open("w", newline="") as f:
            csv.writer(f).writerows(rows[:1] + [r for r in rows[1:] if int(r[0]) <= step])
