"""The network: a DDPM++-style U-Net (`unet`) and the two-stage DualPM model built from two of them."""

from dualpm.model.dualpm import (
    CONFIDENCE_RAW_MAX,
    DualPMNet,
    ModelConfig,
    NetworkOutput,
    confidence_from_raw,
    count_parameters,
    describe,
)
from dualpm.model.unet import UNet, UNetConfig

__all__ = [
    "CONFIDENCE_RAW_MAX",
    "DualPMNet",
    "ModelConfig",
    "NetworkOutput",
    "UNet",
    "UNetConfig",
    "confidence_from_raw",
    "count_parameters",
    "describe",
]
