"""Left-right mirroring of image, mask and dual point maps together (training), and of predictions (test).

Mirroring the image about its vertical centre line is the image of the mirrored scene: camera-space x
negated (the reference cameras have their principal point at the image centre). For an animal whose rest
shape is left-right symmetric, the mirrored animal is the same animal in the mirrored pose, so its
canonical points are the originals with the rest shape's lateral axis negated. Depth order, occupancy and
the mask only move with the pixels. Features are mirrored as images: exact for pixel features (rgb),
close for network features (not exactly flip-equivariant).

A model trained with mirroring can also be run on the mirrored image and its prediction mirrored back
(`mirror_prediction`) and averaged with the direct one (dualpm-infer --mirror-average): two estimates of
the same maps whose errors are partly independent.
"""

from __future__ import annotations

import torch

from dualpm.errors import ConfigError
from dualpm.model.dualpm import NetworkOutput

def _point_signs(canonical_axis: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3,) signs that mirror canonical xyz (the lateral axis negated) and posed xyz (camera x negated)."""
    if canonical_axis not in (0, 1, 2):
        raise ConfigError(f"the canonical mirror axis must be 0, 1 or 2, got {canonical_axis!r}")
    canonical = torch.ones(3, dtype=like.dtype, device=like.device)
    canonical[canonical_axis] = -1
    posed = torch.tensor([-1.0, 1.0, 1.0], dtype=like.dtype, device=like.device)
    return canonical, posed


def mirror_left_right(
    features: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, select: torch.Tensor, canonical_axis: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mirror the selected samples of a batch left-right (see the module docstring).

    Args:
        features: (B, C, H, W) float features; target: (B, H, W, L, 7) dual point maps (canonical xyz,
            posed xyz, alpha), scene units; mask: (B, H, W) object mask; select: (B,) bool, the samples
            to mirror; canonical_axis: 0, 1 or 2, the rest shape's lateral axis (x for the synthetic
            quadrupeds, which face +Z). All on one device.
    Returns:
        (features, target, mask): new tensors, same shapes and dtypes; unselected samples unchanged.
    """
    canonical, posed = _point_signs(canonical_axis, target)
    sign = torch.cat([canonical, posed, torch.ones_like(posed[:1])])  # (7,): alpha keeps its sign
    pick = select.to(features.device)
    features = torch.where(pick[:, None, None, None], features.flip(-1), features)
    target = torch.where(pick[:, None, None, None, None], target.flip(2) * sign, target)  # W is dim 2
    mask = torch.where(pick[:, None, None], mask.flip(-1), mask)
    return features, target, mask


def mirror_prediction(pred: NetworkOutput, canonical_axis: int) -> NetworkOutput:
    """The prediction for the mirrored image, mirrored back: what it says about the original image.

    Args:
        pred: network output for a left-right mirrored input (canonical, posed (B, L, 3, H, W); occupancy
            logits, confidence (B, L, H, W)); canonical_axis: as for `mirror_left_right`.
    """
    canonical, posed = _point_signs(canonical_axis, pred.posed)
    return NetworkOutput(
        canonical=pred.canonical.flip(-1) * canonical[:, None, None],  # (B, L, 3, H, W) * (3, 1, 1)
        posed=pred.posed.flip(-1) * posed[:, None, None],
        occupancy_logit=pred.occupancy_logit.flip(-1),
        confidence=pred.confidence.flip(-1),
    )
