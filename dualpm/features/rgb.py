"""rgb: resized, ImageNet-normalised pixels (optionally with the mask as a 4th channel).

For demos, tests and machines without model weights. A network trained on these sees pixels, not
semantic features, so expect clearly worse reconstructions than with sd-dino. No PCA stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dualpm.errors import ConfigError
from dualpm.features.base import FeatureSpec, bind_spec, check_images, imagenet_normalize
from dualpm.features.pca import FeatureBasis
from dualpm.images import resize_images


class RgbExtractor:
    """Pixels on a `spec.grid` x `spec.grid` grid; see `FeatureExtractor`."""

    def __init__(self, spec: FeatureSpec, device: torch.device):
        bind_spec(self, spec, device, "rgb")
        self.model_id = ""
        self.raw_channels = spec.dim
        self.input_size = spec.grid
        self.stages: dict[str, tuple[int, int]] = {}

    @property
    def grid(self) -> tuple[int, int]:
        return (self.spec.grid, self.spec.grid)

    def inner_features(self, images: Tensor) -> dict[str, Tensor]:
        return {}

    @torch.inference_mode()
    def extract_raw(
        self, images: Tensor, masks: Tensor | None = None, basis: FeatureBasis | None = None
    ) -> Tensor:
        """Pixels on the grid.

        Args:
            images: (B, 3, H, W) float32 RGB in [0, 1], any size and device.
            masks: (B, 1, H, W) float in [0, 1]; required when `rgb_mask_channel`, else ignored.
        Returns:
            (B, dim, grid, grid) float32 on `device`: ImageNet-normalised RGB (+ mask coverage).
        """
        check_images(images, masks)
        x = imagenet_normalize(resize_images(images.to(self.device, torch.float32), self.grid))
        if not self.spec.rgb_mask_channel:
            return x
        if masks is None:
            raise ConfigError("the rgb extractor with rgb_mask_channel needs the object masks")
        # Area averaging gives each grid cell the fraction of it covered by the object.
        m = F.interpolate(masks.to(self.device, torch.float32), size=self.grid, mode="area")
        return torch.cat([x, m], dim=1)
