"""Rank 0's training outputs: TensorBoard, metrics.jsonl and the progress bar; the meter between log lines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from dualpm.fileio import atomic_write_text


class Meter:
    """Loss terms and throughput summed since the last log line."""

    def __init__(self):
        self.total = torch.zeros(4, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        self.total.zero_()
        self.count, self.samples, self.busy = 0, 0, 0.0  # busy: seconds in data + steps

    def add(self, values: torch.Tensor, samples: int, seconds: float) -> None:
        self.total += values.cpu().double()  # also waits for the device: busy time is real
        self.count += 1
        self.samples += samples
        self.busy += seconds

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def rate(self) -> float:
        return self.samples / self.busy


def _step_of(line: str) -> float:
    """Step of a metrics.jsonl line; inf for a torn line (a killed writer) so that it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return math.inf


class RunLog:
    """Rank 0's outputs: TensorBoard, metrics.jsonl, progress bar (all no-ops elsewhere)."""

    def __init__(self, run_dir: Path, enabled: bool, progress: bool, start: int, total: int, continued: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        self.file = None
        self.bar = tqdm(
            total=total, initial=start, desc="train", disable=not (enabled and progress), dynamic_ncols=True
        )
        if not enabled:
            return
        if continued and self.path.exists():
            # Drop lines the interrupted run logged after its checkpoint: they are about to be redone.
            kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines() if _step_of(ln) <= start]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where used

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start + 1 if continued else None)
        self.file = open(self.path, "a", encoding="utf-8")  # an append-only log, one flushed line per record

    def record(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}
        self.file.write(json.dumps({"step": step, "split": split, **clean}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.file.close()
