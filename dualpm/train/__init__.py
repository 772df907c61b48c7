"""Training: typed configs (`config`), checkpoints (`checkpoint`), the DDP loop (`loop`), the CLI (`cli`)."""

from dualpm.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, save_checkpoint
from dualpm.train.config import (
    Config,
    DataConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    read_config,
    resolve_config,
)
from dualpm.train.loop import NonFiniteLossError, TrainResult, train

__all__ = [
    "CheckpointError",
    "Config",
    "DataConfig",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "find_checkpoint",
    "load_checkpoint",
    "read_config",
    "resolve_config",
    "save_checkpoint",
    "train",
]
