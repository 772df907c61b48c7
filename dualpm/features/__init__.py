"""Feature extractors (sd-dino, dino, rgb, precomputed) and their PCA basis.

Typical use (what `dualpm-prep features` does)::

    spec = FeatureSpec("sd-dino", sd_path="weights/sd15", dino_path="weights/dinov2-base")
    extractor = build_extractor(spec, "cuda")            # checks folders/configs, then loads
    basis = load_or_fit_basis(out / "features_basis.safetensors", extractor, sample)  # once, before workers
    feats = extract(extractor, basis, images)            # (B, spec.dim, *extractor.grid) float32

`precomputed` features are not extracted but read: `read_packed(path, spec.dim, spec.grid)`.
Model modules (diffusers, transformers) are imported only when an extractor needs them.
"""

from dualpm.features.base import (
    EXTRACTORS,
    FeatureExtractor,
    FeatureSpec,
    check_basis,
    extract,
    fit_basis,
    load_or_fit_basis,
)
from dualpm.features.pca import FeatureBasis, PCABasis
from dualpm.features.precomputed import (
    decode_packed,
    encode_packed,
    read_packed,
    spec_from_packed,
    write_packed,
)
from dualpm.features.registry import build_extractor

__all__ = [
    "EXTRACTORS",
    "FeatureBasis",
    "FeatureExtractor",
    "FeatureSpec",
    "PCABasis",
    "build_extractor",
    "check_basis",
    "decode_packed",
    "encode_packed",
    "extract",
    "fit_basis",
    "load_or_fit_basis",
    "read_packed",
    "spec_from_packed",
    "write_packed",
]
