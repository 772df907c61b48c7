"""Object masks: the one decoder every path uses (render stage, reader, features, inference on images).

Masks arrive in every encoding people save them in: 0/1 or 0/255 8-bit grey (the published DualPM set
stores 0/1, which the reference reader requires), 1-bit, 16-bit, RGB, or the alpha channel of an RGBA
cut-out. The meaning is decided from the values, not from the dtype alone:

* **binary**: the mask holds at most two values, 0 and one other value v (0/1, 0/255, 0/65535, 1-bit
  False/True, ...): inside where the value is v. A mask of a single non-zero value is all inside; all
  zeros is empty.
* **soft** (anti-aliased, matting): more than two values, spanning the full range of an 8-bit (0..255) or
  16-bit (0..65535) image, or floats in [0, 1]: the value / full range is the inside fraction.
* anything else (e.g. 37 levels between 0 and 200) is not a mask we can interpret: `MaskError`
  naming the file and what it holds, never a silently empty or full mask.

Where an image has a non-constant alpha channel, the alpha channel is the mask (cut-outs); otherwise the
brightest colour channel is (grey saved as RGB, coloured masks on black).

    decode_mask(array, where)   -> (H, W) float32 in [0, 1] (binary masks give exactly 0 and 1)
    read_mask(path_or_bytes)    -> the same, from a file or its bytes
    resize_mask(mask, (H, W))   -> (H, W) float32 in {0, 1}: area resampling, inside where > 0.5
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dualpm.errors import DatasetError
from dualpm.images import ImageSource, image_array, open_image

INSIDE = 0.5  # a resampled or soft mask pixel is inside when more than half of it is


class MaskError(DatasetError):
    """A mask file whose values cannot be read as an object mask."""


def _mask_channel(array: np.ndarray, where: str) -> np.ndarray:
    """(H, W) values of the channel that holds the mask (see the module docstring)."""
    if array.ndim == 2:
        return array
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise MaskError(f"{where}: a mask must be a grey, grey+alpha, RGB or RGBA image, got shape {array.shape}")
    channels = array.shape[2]
    if channels in (2, 4):
        alpha = array[..., -1]
        if alpha.min() != alpha.max():
            return alpha
        array = array[..., :-1]
    return array.max(axis=2)


def decode_mask(array: np.ndarray, where: str) -> np.ndarray:
    """Interpret decoded image values as an object mask.

    Args:
        array: (H, W) or (H, W, C) bool, unsigned/signed integer or float values, as `images.image_array`
            gives them (C: 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA).
        where: names the file or sample in error messages.
    Returns:
        (H, W) float32 in [0, 1], CPU numpy: 0/1 for binary masks, value / full range for soft ones.
    Raises:
        MaskError: values that are neither binary nor a full-range soft mask (see the module docstring).
    """
    values = _mask_channel(np.asarray(array), where)
    if values.dtype == np.bool_:
        return values.astype(np.float32)
    if values.dtype.kind not in "uif":
        raise MaskError(f"{where}: mask values of type {values.dtype} are not numbers")
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise MaskError(f"{where}: mask has NaN or infinite values")
    low, high = values.min(initial=0), values.max(initial=0)
    if low < 0:
        raise MaskError(f"{where}: mask has negative values (down to {low})")
    if high == 0:
        return np.zeros(values.shape, np.float32)
    if np.all((values == 0) | (values == high)):  # binary: 0 and one other value
        return (values == high).astype(np.float32)
    full = _full_range(values, high)
    if full is None:
        levels = len(np.unique(values))
        raise MaskError(
            f"{where}: mask values are neither binary nor a full-range soft mask: {levels} levels from "
            f"{low} to {high} ({values.dtype}); expected two values (0/1, 0/255, 1-bit, ...) or a soft mask "
            "spanning 0..255 (8-bit), 0..65535 (16-bit) or 0..1 (float)"
        )
    return (values.astype(np.float32) / np.float32(full)).clip(0.0, 1.0)


def _full_range(values: np.ndarray, high: float) -> float | None:
    """The full-scale value of a soft mask (1, 255 or 65535), or None when `high` is none of them."""
    if values.dtype.kind == "f":
        return 1.0 if high <= 1.0 else None
    candidates = (255,) if values.dtype.itemsize == 1 else (255, 65535)  # 8-bit data in 16-bit files too
    return float(high) if int(high) in candidates else None


def read_mask(source: ImageSource, where: str | None = None) -> np.ndarray:
    """Read a mask file (or the bytes of one) with `decode_mask`.

    Args:
        source: a path, or the file's bytes (e.g. a stored sample's "mask.png").
        where: names the source in error messages (default: the path).
    Returns:
        (H, W) float32 in [0, 1], CPU numpy.
    Raises:
        DatasetError (MaskError for uninterpretable values) naming `where`.
    """
    name = where if where is not None else (str(source) if isinstance(source, (str, os.PathLike)) else "mask")
    image = open_image(Path(source) if isinstance(source, (str, os.PathLike)) else source, name)
    return decode_mask(image_array(image), name)


def resize_mask(mask: np.ndarray | Tensor, size: tuple[int, int]) -> Tensor:
    """Resample a mask by area and threshold it: each output pixel is inside when most of it is.

    Args:
        mask: (H, W) or (B, H, W) values in [0, 1] (float, or bool), CPU numpy or torch.
        size: (height, width) of the output, pixels.
    Returns:
        (h, w) or (B, h, w) float32 in {0, 1}, on the input's device (CPU for numpy input).
    """
    m = torch.as_tensor(mask).float()
    batched = m.ndim == 3
    m = m if batched else m[None]  # (B, H, W)
    if tuple(m.shape[-2:]) != tuple(size):
        # Area (not nearest): a thin part of the animal is neither dropped nor thickened at random.
        m = F.interpolate(m[:, None], size=tuple(size), mode="area")[:, 0]
    out = (m > INSIDE).float()
    return out if batched else out[0]


def mask_iou(mask: np.ndarray | Tensor, coverage: np.ndarray | Tensor) -> float:
    """Intersection over union of two (H, W) masks (values > 0.5 are inside); 1.0 when both are empty."""
    a, b = torch.as_tensor(mask) > INSIDE, torch.as_tensor(coverage) > INSIDE
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union
