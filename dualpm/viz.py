"""Colour maps and picture sheets for dual point maps (used by `dualpm-prep show`, inference sheets, reports).

All functions take NumPy arrays or CPU tensors and return uint8 images; nothing loops over pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = 0  # grey level of pixels without a value


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def canonical_to_rgb(
    canon: np.ndarray | torch.Tensor,
    bbox: np.ndarray | Sequence[Sequence[float]] | None = None,
    mask: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Colour canonical coordinates: x, y, z mapped linearly from the box to red, green, blue.

    Args:
        canon: (..., 3) float canonical points, scene units.
        bbox: (2, 3) box corners (min, max) mapped to 0 and 255; None: the bounding box of the
            masked points (so one object fills the colour cube).
        mask: (...) bool, points to colour; others get `BACKGROUND`. None: all points.
    Returns:
        (..., 3) uint8 colours.
    """
    points = _numpy(canon).astype(np.float64)
    keep = np.ones(points.shape[:-1], bool) if mask is None else _numpy(mask).astype(bool)
    keep = keep & np.isfinite(points).all(axis=-1)
    if bbox is None:
        inside = points[keep]  # (N, 3)
        lo, hi = (inside.min(0), inside.max(0)) if len(inside) else (np.zeros(3), np.ones(3))
    else:
        lo, hi = np.asarray(bbox, dtype=np.float64)
    scale = np.where(hi - lo > 0, hi - lo, 1.0)
    colour = np.clip((points - lo) / scale, 0.0, 1.0) * 255.0
    return np.where(keep[..., None], np.nan_to_num(colour).round(), BACKGROUND).astype(np.uint8)


def depth_to_rgb(
    depth: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor | None = None,
    cmap: str = "turbo",
    limits: tuple[float, float] | None = None,
) -> np.ndarray:
    """Colour a depth map with a matplotlib colour map.

    Args:
        depth: (H, W) (or any shape) float depths, scene units.
        mask: same shape, bool: pixels with a depth; others get `BACKGROUND`. None: finite pixels.
        cmap: matplotlib colour map name.
        limits: (near, far) mapped to the ends of the colour map; None: the masked range.
    Returns:
        (..., 3) uint8 colours.
    """
    values = _numpy(depth).astype(np.float64)
    keep = np.isfinite(values) if mask is None else _numpy(mask).astype(bool) & np.isfinite(values)
    if limits is None:
        limits = (values[keep].min(), values[keep].max()) if keep.any() else (0.0, 1.0)
    lo, hi = limits
    t = np.clip((values - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    colour = matplotlib.colormaps[cmap](np.nan_to_num(t), bytes=True)[..., :3]  # (..., 3) uint8
    return np.where(keep[..., None], colour, BACKGROUND).astype(np.uint8)


def _as_rgb(tile: np.ndarray | torch.Tensor) -> np.ndarray:
    image = _numpy(tile)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        raise ValueError(f"tiles must be uint8 or bool images, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"tiles must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")
    return image[..., :3]


def image_grid(
    tiles: Sequence[np.ndarray | torch.Tensor],
    labels: Sequence[str] | None = None,
    columns: int | None = None,
    cell: int | None = None,
    pad: int = 4,
) -> Image.Image:
    """Lay out images in a grid with a small text label above each.

    Args:
        tiles: images (H, W) uint8/bool or (H, W, 3 | 4) uint8, of any sizes: each is scaled (nearest
            neighbour, aspect kept) to fit a `cell` x `cell` square (default: the largest tile side).
        labels: one caption per tile (PIL's default font), or None.
        columns: tiles per row (default: all in one row).
    Returns:
        An RGB PIL image.
    """
    if not tiles:
        raise ValueError("image_grid needs at least one tile")
    labels = [""] * len(tiles) if labels is None else list(labels)
    if len(labels) != len(tiles):
        raise ValueError(f"{len(labels)} labels for {len(tiles)} tiles")
    images = [_as_rgb(t) for t in tiles]
    cell = cell or max(max(i.shape[:2]) for i in images)
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    font = ImageFont.load_default()
    text_h = (font.getbbox("Ag")[3] + 4) if any(labels) else 0
    sheet_size = (columns * (cell + pad) + pad, rows * (cell + text_h + pad) + pad)
    sheet = Image.new("RGB", sheet_size, (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        x = pad + (k % columns) * (cell + pad)
        y = pad + (k // columns) * (cell + text_h + pad)
        h, w = image.shape[:2]
        size = (max(1, round(w * cell / max(h, w))), max(1, round(h * cell / max(h, w))))
        sheet.paste(Image.fromarray(image).resize(size, Image.Resampling.NEAREST), (x, y + text_h))
        if label:
            draw.text((x, y), label, fill=(0, 0, 0), font=font)
    return sheet
