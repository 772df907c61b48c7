"""The dual point map: one definition of its channels and of its two layouts.

A dual point map gives, per pixel and depth layer, the surface point in the animal's canonical rest pose
and the same point in camera space. Layer l is the l-th distinct surface along the pixel's ray (depth
peeling). Two layouts exist, and code converts between them only here:

* **channel-last** `(..., H, W, L, 7)`: what the renderers produce, the store keeps and the reader yields.
  Channels: canonical xyz (`CANONICAL`), posed xyz (`POSED`), alpha (`ALPHA`): 1 where layer l hit a
  surface, and then all 7 channels are meaningful; 0 elsewhere, with all 7 channels 0.
* **channel-first** `DualMaps`: canonical and posed `(B, L, 3, H, W)`, alpha `(B, L, H, W)`: the network's
  layout (convolutions want channels before pixels), used by the loss, inference and evaluation.

Units: canonical points in the rig's rest-pose (bind) coordinates, posed points in camera space (OpenGL
camera: looking down -Z, +Y up) with the camera's z translation `view[2, 3]` subtracted from z, so depth is
centred on the object; both in scene units (metres in the published set). The channel slices index numpy
arrays and torch tensors alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dualpm.errors import ConfigError, DatasetError

CHANNELS = 7
CANONICAL = slice(0, 3)  # canonical x, y, z
POSED = slice(3, 6)  # posed x, y, z (camera space, z minus view[2, 3])
POSED_Z = 5  # the posed depth channel
ALPHA = 6  # 1 where the layer hit a surface, else 0
POINTS = slice(0, 6)  # canonical then posed: the six values stored for a hit


@dataclass(frozen=True)
class DualMaps:
    """Dual point maps in the channel-first layout (float32, one device).

    canonical: (B, L, 3, H, W) scene units. posed: (B, L, 3, H, W) scene units, camera space (z minus
    view[2, 3]). alpha: (B, L, H, W) in [0, 1].
    """

    canonical: torch.Tensor
    posed: torch.Tensor
    alpha: torch.Tensor


def to_channel_first(dpm: torch.Tensor, num_layers: int | None = None) -> DualMaps:
    """Channel-last dual point maps -> `DualMaps`.

    Args:
        dpm: (B, H, W, L, 7) float, any device (canonical xyz, posed xyz, alpha).
        num_layers: keep the first (nearest) `num_layers` layers; None keeps all.
    Returns:
        `DualMaps` of float32 tensors on `dpm`'s device.
    """
    if dpm.ndim != 5 or dpm.shape[-1] != CHANNELS:
        raise DatasetError(f"dual point maps must have shape (B, H, W, L, {CHANNELS}), got {tuple(dpm.shape)}")
    if num_layers is not None:
        if num_layers > dpm.shape[3]:
            raise ConfigError(f"{num_layers} layers requested but the dual point maps hold {dpm.shape[3]}")
        dpm = dpm[:, :, :, :num_layers]
    t = dpm.float().permute(0, 3, 4, 1, 2)  # (B, H, W, L, 7) -> (B, L, 7, H, W)
    return DualMaps(canonical=t[:, :, CANONICAL], posed=t[:, :, POSED], alpha=t[:, :, ALPHA])


def to_channel_last(maps: DualMaps) -> torch.Tensor:
    """Inverse of `to_channel_first`: `DualMaps` -> (B, H, W, L, 7) float32, contiguous."""
    t = torch.cat([maps.canonical, maps.posed, maps.alpha[:, :, None]], dim=2)  # (B, L, 7, H, W)
    return t.permute(0, 3, 4, 1, 2).contiguous()  # (B, L, 7, H, W) -> (B, H, W, L, 7)


def hits(dpm):
    """Boolean (..., H, W, L) where a layer hit a surface, from channel-last maps (numpy or torch)."""
    return dpm[..., ALPHA] > 0.5
