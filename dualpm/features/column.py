"""The features column of a prepared store: its name, its field, and the config recorded with it.

`dualpm-prep features` writes the column; the trainer copies its config into checkpoints, and
`dualpm-infer` reads that config back to rebuild the extractor and to refuse a dataset whose features
were made another way. The config is `FeatureSpec.to_dict()` plus `EXTRA_CONFIG_KEYS`: basis file
(relative to the store; None without PCA), its content hash, the weights' fingerprint, the PCA sample
count and the run settings.
"""

from __future__ import annotations

from typing import Any

from dualpm.features.base import FeatureSpec

COLUMN = "features"
FIELD = "features"  # the reader (dualpm/data/reader.py) looks for exactly this name
BASIS_NAME = "features.basis.safetensors"  # next to the store's manifest.json
# Column config keys that are not FeatureSpec fields.
EXTRA_CONFIG_KEYS = ("basis", "basis_sha256", "model_id", "pca_samples", "batch", "device", "threads",
                     "schema_version", "tool_version")
# May differ between runs of one column: where the weights are mounted, bf16 and device (numerics
# only), speed settings. The weights themselves are compared through `model_id` and the basis.
VOLATILE = ("sd_path", "dino_path", "cuda_bf16", "batch", "device", "threads", "tool_version")


def spec_from_column(config: dict[str, Any]) -> FeatureSpec:
    """The `FeatureSpec` recorded in a features column config (its other keys dropped)."""
    return FeatureSpec.from_dict({k: v for k, v in config.items() if k not in EXTRA_CONFIG_KEYS})


def uses_basis(spec: FeatureSpec) -> bool:
    """Whether the extractor has PCA stages to fit (stored in the store's `BASIS_NAME`)."""
    return spec.extractor in ("sd-dino", "dino")
