"""What both halves of `dualpm-demo` share: its settings, where each stage writes, the learning bar.

`pipeline/demo.py` runs the stages and `pipeline/demo_report.py` writes the report. Both import this
module; the report imports nothing of demo.py, and demo.py imports the report writer (and with it
matplotlib) only once the stages are done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_NAME = "demo_state.json"
LEARNING_BAR = 0.5  # the model must at least halve the constant baseline's Chamfer distance
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoConfig:
    out: str
    train_config: str
    samples: int = 3000
    models: int = 1  # one animal: the network learns its depth in the CPU budget (see configs/demo.yaml)
    image_size: int = 128
    faces: int = 5000
    resolution: int = 32
    layers: int = 4
    shard_size: int = 64
    extractor: str = "rgb"  # "sd-dino" when both weight folders are given
    sd_model: str | None = None
    dino_model: str | None = None
    seed: int = 0
    device: str = "auto"
    sequence_frames: int = 24  # the held-out sequence animated at the end (0: no animation stages)


class Paths:
    """Where each stage writes, under OUT."""

    def __init__(self, out: Path):
        self.out = out
        self.source, self.data, self.run = out / "source", out / "data", out / "run"
        self.pred, self.eval, self.report = out / "pred", out / "eval", out / "report"
        self.state = out / STATE_NAME
        # the held-out sequence: its own source, store and predictions, and the animated rig
        sequence = out / "sequence"
        self.seq_source, self.seq_data, self.seq_pred = sequence / "source", sequence / "data", sequence / "pred"
        self.animation = out / "animation"
