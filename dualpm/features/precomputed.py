"""precomputed: the published dataset's packed feature images, `features/<id>_feat.png`.

Layout (as the reference reader decodes it): C feature channels (64) are stored as T = ceil(C / 3)
RGB tiles of h x w pixels placed side by side (image width T * w); channel c is colour c % 3 of
tile c // 3; the stored byte is v = round((x + 1) * 127), so x = v / 127 - 1 (x in [-1, 1.008]).
The last 3T - C channels (2 for 64 channels) are padding, written here as v = 127 (x = 0).

Users of the published dataset can import these instead of running the extractor; no PCA is
involved (the features are already 64 channels).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from dualpm.errors import DatasetError
from dualpm.features.base import FeatureSpec
from dualpm.fileio import atomic_output


def tiles_for(channels: int) -> int:
    """Number of RGB tiles that hold `channels` channels."""
    return -(-channels // 3)


def decode_packed(packed: np.ndarray, channels: int = 64) -> Tensor:
    """Unpack tiles to features.

    Args:
        packed: (h, T * w, 3) uint8 array, T = tiles_for(channels).
        channels: feature channels C stored.
    Returns:
        (C, h, w) float32 CPU tensor, exactly v / 127 - 1.
    """
    tiles = tiles_for(channels)
    if packed.dtype != np.uint8 or packed.ndim != 3 or packed.shape[2] != 3:
        raise ValueError(f"packed features must be (h, W, 3) uint8, got {packed.shape} {packed.dtype}")
    h, width, _ = packed.shape
    if width % tiles:
        raise ValueError(f"packed width {width} is not a multiple of {tiles} tiles")
    w = width // tiles
    # (h, T*w, 3) -> (h, T, w, 3) -> (T, 3, h, w) -> (3T, h, w): channel t*3+c is colour c of tile t.
    planes = packed.reshape(h, tiles, w, 3).transpose(1, 3, 0, 2).reshape(3 * tiles, h, w)[:channels]
    return torch.from_numpy(planes.astype(np.float32) / np.float32(127.0) - np.float32(1.0))


def encode_packed(features: Tensor | np.ndarray) -> np.ndarray:
    """Pack features (C, h, w) float into (h, T * w, 3) uint8; values are clipped to [-1, 1.008]."""
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if x.ndim != 3:
        raise ValueError(f"features must be (C, h, w), got {x.shape}")
    c, h, w = x.shape
    tiles = tiles_for(c)
    v = np.clip(np.rint((x.astype(np.float64) + 1.0) * 127.0), 0, 255).astype(np.uint8)
    padded = np.full((3 * tiles, h, w), 127, dtype=np.uint8)
    padded[:c] = v
    # (3T, h, w) -> (T, 3, h, w) -> (h, T, w, 3) -> (h, T*w, 3)
    return np.ascontiguousarray(padded.reshape(tiles, 3, h, w).transpose(2, 0, 3, 1).reshape(h, tiles * w, 3))


def read_packed(path: str | os.PathLike, channels: int = 64, grid: int | None = None) -> Tensor:
    """Read a packed feature PNG as (C, h, w) float32; `grid`, when given, is the required h and w.

    A missing, corrupt or wrongly shaped file raises `DatasetError` naming it.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            packed = np.asarray(img)
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot read packed features ({err})") from err
    tiles = tiles_for(channels)
    if mode != "RGB":
        raise DatasetError(f"{path}: packed features must be an 8-bit RGB image, got mode {mode}")
    if packed.shape[1] % tiles:
        raise DatasetError(f"{path}: width {packed.shape[1]} is not {tiles} tiles of {channels} channels")
    h, w = packed.shape[0], packed.shape[1] // tiles
    if grid is not None and (h, w) != (grid, grid):
        raise DatasetError(f"{path}: feature tiles are {h}x{w}, expected {grid}x{grid}")
    return decode_packed(packed, channels)


def write_packed(path: str | os.PathLike, features: Tensor | np.ndarray) -> None:
    """Write (C, h, w) features as a packed PNG, atomically."""
    packed = encode_packed(features)
    with atomic_output(path) as tmp:
        Image.fromarray(packed).save(tmp, format="PNG")


def spec_from_packed(path: str | os.PathLike, channels: int = 64) -> FeatureSpec:
    """The `FeatureSpec` of a dataset's packed features, read off one of its files."""
    feats = read_packed(path, channels)
    if feats.shape[1] != feats.shape[2]:
        size = f"{feats.shape[1]}x{feats.shape[2]}"
        raise DatasetError(f"{path}: feature tiles are {size}, expected square tiles")
    return FeatureSpec(extractor="precomputed", dim=channels, grid=feats.shape[1])

