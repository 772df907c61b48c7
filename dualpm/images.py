"""Image files and image tensors: the one place images are decoded and resized.

Files come from users (the published dataset, photos, any viewer's export), so decoding accepts every
common PNG/JPEG/TIFF flavour: 1-bit, 8- and 16-bit grey, palettes (with or without transparency), RGB,
RGBA, with their EXIF orientation applied (photos come upright, as viewers show them); a file of
several frames (animated GIF, multi-page TIFF) is refused. Problems raise `DatasetError` naming the
file (or the stored sample the bytes came from).

    open_image(path_or_bytes)   -> PIL image, fully decoded (the file is closed)
    image_array(image)          -> numpy array as stored (bool / uint8 / uint16 / int32 / float32),
                                   palettes expanded to their colours
    load_image(path)            -> (3, H, W) float32 RGB in [0, 1]: what feature extractors take
    resize_images / stack_images: batches of float images to a common size

Masks are decoded by `dualpm.masks`, on top of `open_image` and `image_array`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from dualpm.errors import DatasetError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview

# PIL modes whose numpy view is already the stored values; anything else (palettes, CMYK, YCbCr,
# premultiplied alpha) is converted to RGB(A) so callers see colours, not palette indices.
_DIRECT_MODES = {"1", "L", "LA", "RGB", "RGBA", "I;16", "I;16L", "I;16B", "I", "F"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I"}
_ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and / or rotated
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)


def _describe(source: ImageSource, where: str | None) -> str:
    if where is not None:
        return where
    return "image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def open_image(source: ImageSource, where: str | None = None) -> Image.Image:
    """Decode an image file, or the bytes of one, completely.

    Args:
        source: a path, or the file's bytes (e.g. a field of a stored sample).
        where: names the source in error messages (default: the path).
    Returns:
        A loaded PIL image (no file handle stays open).
    Raises:
        DatasetError: missing, truncated or not an image, naming `where`.
    """
    name = _describe(source, where)
    try:
        stream = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray, memoryview)) else source
        with Image.open(stream) as image:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                raise DatasetError(f"{name}: an image of {frames} frames (animated, or several pages); one "
                                   "still image is expected")
            image.load()
            # As cameras write them: a phone stores its pixels as the sensor saw them and says in EXIF
            # how to turn them upright. Every reader (images, masks, stored bytes) sees them upright.
            if image.getexif().get(_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            return image.copy() if image.mode in _DIRECT_MODES else _expanded(image)
    except _DECODE_ERRORS as err:
        raise DatasetError(f"{name}: cannot read image ({err})") from err


def _expanded(image: Image.Image) -> Image.Image:
    # Palette (P, PA) and other modes: their colours, keeping transparency where the file has any.
    has_alpha = image.mode in ("PA", "RGBa", "La") or "transparency" in image.info
    return image.convert("RGBA" if has_alpha else "RGB")


def image_array(image: Image.Image) -> np.ndarray:
    """The pixel values of an image from `open_image`, as stored.

    Returns:
        (H, W) bool ("1"), uint8 ("L"), uint16 (16-bit grey), int32 ("I"), float32 ("F"), or
        (H, W, 2 | 3 | 4) uint8 (grey + alpha, RGB, RGBA). CPU numpy, a copy.
    """
    if image.mode not in _DIRECT_MODES:
        image = _expanded(image)
    return np.array(image)


def rgb_array(image: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 RGB in [0, 1] of an image from `open_image`.

    Grey is repeated to 3 channels, 16-bit images are scaled by 1/65535, images with transparency are
    composited over black (the masked background of the renders), palettes are expanded.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        return rgba[..., :3] * rgba[..., 3:4]  # composite over black
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | os.PathLike) -> Tensor:
    """Read an image file as (3, H, W) float32 RGB in [0, 1] on the CPU (see `rgb_array`).

    A missing, truncated or unreadable file raises `DatasetError` naming it.
    """
    rgb = rgb_array(open_image(Path(path)))
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).contiguous()  # (H,W,3) -> (3,H,W)


def resize_images(images: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize a batch to `size` (bilinear, antialiased when shrinking; aspect ratio not kept).

    Args:
        images: (B, C, H, W) float tensor, any device.
        size: output side, or (height, width), in pixels.
    Returns:
        (B, C, h, w) tensor of the same dtype and device (the input itself when already that size).
    """
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == hw:
        return images
    shrink = images.shape[-2] > hw[0] or images.shape[-1] > hw[1]
    return F.interpolate(images, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


def stack_images(images: Sequence[Tensor], size: int) -> Tensor:
    """Batch images of any sizes: each (C, H_i, W_i) is resized to (size, size) -> (B, C, size, size)."""
    return torch.cat([resize_images(im[None].float(), size) for im in images])
