"""The two-stage DualPM network: features -> layered canonical + posed point maps.

Stage 1 predicts layer-1 canonical xyz from the features alone. Stage 2 sees the features and the DETACHED
stage-1 output (so stage 2's loss never trains stage 1; each stage has its own objective) and predicts all
the rest. Stage-2 channel layout, L = num_layers:

    0:3 layer-1 posed xyz | 3 layer-1 occupancy logit | 4 layer-1 confidence raw |
    then for layers 2..L, 8 channels each: canonical xyz (3), posed xyz (3), occupancy logit, confidence raw
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dualpm.errors import ConfigError
from dualpm.model.unet import UNet, UNetConfig, _is_int

# Confidence is 1 + exp(raw). exp overflows float32/bfloat16 above ~88.7; clamping raw at 30 keeps
# c <= 1.1e13, still finite after multiplying by squared errors up to ~1e25. The loss optimum
# c = alpha / err^2 only reaches e^30 for errors below ~3e-7 scene units (float32 resolution), so the
# clamp never binds in practice (it only zeroes the gradient of absurd raw values).
CONFIDENCE_RAW_MAX = 30.0


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 64  # feature channels
    num_layers: int = 4  # depth layers L predicted
    unet: UNetConfig = field(default_factory=UNetConfig)

    def __post_init__(self) -> None:
        for name in ("in_channels", "num_layers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"ModelConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.unet, UNetConfig):
            raise ConfigError(f"ModelConfig.unet must be a UNetConfig, got {type(self.unet).__name__}")


@dataclass
class NetworkOutput:
    """Network output, all float32 on the model's device, channel-first.

    canonical: (B, L, 3, H, W) canonical (rest-pose) xyz, scene units.
    posed: (B, L, 3, H, W) camera-space xyz with the camera depth subtracted, scene units.
    occupancy_logit: (B, L, H, W) logit of "layer l hits a surface at this pixel".
    confidence: (B, L, H, W) c = 1 + exp(min(raw, CONFIDENCE_RAW_MAX)) >= 1.
    """

    canonical: torch.Tensor
    posed: torch.Tensor
    occupancy_logit: torch.Tensor
    confidence: torch.Tensor


def confidence_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """c = 1 + exp(raw), computed in float32 with raw clamped above at CONFIDENCE_RAW_MAX (finite, >= 1)."""
    return 1.0 + torch.exp(raw.float().clamp(max=CONFIDENCE_RAW_MAX))


class DualPMNet(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        num_layers = config.num_layers
        self.stage1 = UNet(config.in_channels, 3, config.unet)
        self.stage2 = UNet(config.in_channels + 3, 5 + 8 * (num_layers - 1), config.unet)

    def forward(self, features: torch.Tensor) -> NetworkOutput:
        """Predict dual point maps.

        Args:
            features: (B, C, H, W) float feature image (C = config.in_channels), any device, any H, W.
        Returns:
            `NetworkOutput`, float32 tensors of spatial size H x W (also under autocast).
        """
        if features.ndim != 4 or features.shape[1] != self.config.in_channels:
            raise ConfigError(
                f"DualPMNet expects features (B, {self.config.in_channels}, H, W), "
                f"got {tuple(features.shape)}"
            )
        b, _, h, w = features.shape
        num_layers = self.config.num_layers
        canon1 = self.stage1(features)  # (B, 3, H, W)
        out = self.stage2(torch.cat([features, canon1.detach().to(features.dtype)], dim=1)).float()
        canon1 = canon1.float()
        rest = out[:, 5:].reshape(b, num_layers - 1, 8, h, w)  # layers 2..L, 8 channels each
        return NetworkOutput(
            canonical=torch.cat([canon1[:, None], rest[:, :, 0:3]], dim=1),
            posed=torch.cat([out[:, None, 0:3], rest[:, :, 3:6]], dim=1),
            occupancy_logit=torch.cat([out[:, 3:4], rest[:, :, 6]], dim=1),
            confidence=confidence_from_raw(torch.cat([out[:, 4:5], rest[:, :, 7]], dim=1)),
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(model: DualPMNet) -> str:
    """One line, e.g. 'DualPMNet: 2 x UNet(128, (1, 2, 2, 2), attn (3,)), in 64, L=4, 72.1M parameters'."""
    cfg = model.config
    u = cfg.unet
    return (
        f"DualPMNet: 2 x UNet({u.base_channels}, {u.channel_mult}, attn {u.attention_levels}), "
        f"in {cfg.in_channels}, L={cfg.num_layers}, {count_parameters(model) / 1e6:.1f}M parameters"
    )
