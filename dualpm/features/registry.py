"""Which class implements each extractor name: the one place that knows every implementation.

`base.py` defines the spec and the interface and imports no extractor; the extractors import base;
this module imports them all. Importing it loads no model library (diffusers and transformers are
imported when an extractor is built).
"""

from __future__ import annotations

import torch

from dualpm.errors import ConfigError
from dualpm.features.base import FeatureExtractor, FeatureSpec
from dualpm.features.dino import DinoExtractor
from dualpm.features.rgb import RgbExtractor
from dualpm.features.sd_dino import SdDinoExtractor

# extractor name (FeatureSpec.extractor) -> class(spec, device); "precomputed" is read, never built.
REGISTRY: dict[str, type] = {"sd-dino": SdDinoExtractor, "dino": DinoExtractor, "rgb": RgbExtractor}


def build_extractor(spec: FeatureSpec, device: str | torch.device = "cpu") -> FeatureExtractor:
    """Check the spec's model folders and load the extractor onto `device`.

    Every folder, model class and config is checked before any weights are loaded; problems raise
    `ConfigError` naming the folder. Weights are read from local paths only (never downloaded).
    """
    if spec.extractor not in REGISTRY:
        raise ConfigError(
            "extractor 'precomputed' has no model to build: its features are read from the dataset's "
            "features/<id>_feat.png files with dualpm.features.precomputed.read_packed"
        )
    return REGISTRY[spec.extractor](spec, torch.device(device))
