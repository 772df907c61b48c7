"""Dual point maps as sparse arrays, and image helpers: the numbers both containers store.

A dense dual point map `(H, W, L, 7)` is mostly empty (background pixels, missing deeper layers), and its
layers are depth-peeled (a pixel's hits are always layers 0..k-1), so it is stored as two plain arrays:

    counts  (H, W) uint8                 hits per pixel (alpha is implied: layer l is hit where l < count)
    values  (M, 6) float16 | float32     canonical xyz, posed xyz of the M = counts.sum() hits, ordered
                                         layer-major, then raster order (row by row): neighbouring values
                                         lie on the same surface, which compresses well

    layer, pixel = np.nonzero(np.arange(L)[:, None] < counts.reshape(-1)[None, :])   # the hits, in order
    dense = np.zeros((H * W, L, 7)); dense[pixel, layer, :6] = values; dense[pixel, layer, 6] = 1

WebDataset stores them in an npz (`dpm_npz`), Zarr as typed arrays (`zarr_layout.py`); docs/format.md
has the recipes. Measured on 16 renders of a procedural quadruped (160x160, 8 layers, ~5k hits):
float16 values take 25.5% of the reference code's npz in Zarr (blosc-zstd) and 34% in the npz (deflate);
docs/benchmarks.md.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dualpm.errors import DatasetError
from dualpm.images import image_array, open_image, rgb_array
from dualpm.pointmaps import ALPHA, CHANNELS, POINTS

PRECISIONS = ("float16", "float32")
MAX_LAYERS = 255  # hit counts are uint8
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_NPZ_TIME = (1980, 1, 1, 0, 0, 0)  # fixed member times: the same map always gives the same bytes


class EncodingError(DatasetError):
    """A dual point map or image that cannot be stored, or stored data that do not decode."""


@dataclass(frozen=True, eq=False)
class SparseDualPointMap:
    """A dual point map already in the stored form (module docstring), as the CPU renderer makes it: no
    dense (H, W, L, 7) block to fill, scan and split again. Stores take it wherever they take a dense map.

    counts: (H, W) uint8 hits per pixel. values: (M, 6) float32, scene units, canonical xyz and posed xyz
    of the M = counts.sum() hits in `hit_order`. layers: L, the map's depth layers.
    """

    counts: np.ndarray
    values: np.ndarray
    layers: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(H, W, L, 7): the dense map's shape."""
        return (*self.counts.shape, self.layers, CHANNELS)

    def dense(self) -> np.ndarray:
        """(H, W, L, 7) float32 dense map (`dense_dual_pointmap`)."""
        return dense_dual_pointmap(self.counts, self.values, self.layers)


def _check_sparse(counts: np.ndarray, values: np.ndarray, layers: int) -> None:
    """Raise EncodingError unless counts and values form a sparse map of `layers` layers with finite values."""
    if counts.ndim != 2 or counts.dtype != np.uint8:
        raise EncodingError(f"dual point map counts must be (H, W) uint8, got {counts.dtype}{counts.shape}")
    if values.ndim != 2 or values.shape[1] != 6 or values.dtype.kind != "f":
        raise EncodingError(f"dual point map values must be (M, 6) float, got {values.dtype}{values.shape}")
    if not 0 < layers <= MAX_LAYERS:
        raise EncodingError(f"dual point map has {layers} layers (1 to {MAX_LAYERS})")
    if int(counts.sum(dtype=np.int64)) != len(values) or counts.max(initial=0) > layers:
        raise EncodingError(
            f"dual point map counts ({int(counts.sum(dtype=np.int64))} hits, up to {counts.max(initial=0)} per "
            f"pixel) disagree with its {len(values)} values or {layers} layers"
        )
    if not np.isfinite(values).all():
        raise EncodingError("dual point map values are not all finite")


def hit_order(counts: np.ndarray, layers: int) -> tuple[np.ndarray, np.ndarray]:
    """(layer, pixel) (M,) intp indices of the hits of `counts` ((H, W) hits per pixel), layer-major then
    raster: `np.nonzero(np.arange(layers)[:, None] < counts.reshape(-1)[None, :])`, computed a layer at a
    time (10x faster: most pixels have few layers, and the loop stops at the first empty one)."""
    flat = counts.reshape(-1)
    layer, pixel = [np.zeros(0, np.intp)], [np.zeros(0, np.intp)]
    for index in range(layers):
        found = np.flatnonzero(flat > index)
        if len(found) == 0:
            break  # hits are layer prefixes: no pixel has a deeper one
        pixel.append(found)
        layer.append(np.full(len(found), index, np.intp))
    return np.concatenate(layer), np.concatenate(pixel)


def _nonzero(array: np.ndarray) -> int:
    """np.count_nonzero of a float array (+-0.0 count as zero, NaN as non-zero), 2-3x faster: the bits of
    each number shifted left by one (dropping the sign) are zero exactly for +-0.0, and counting non-zero
    integers is a vectorised scan where counting non-zero floats is not."""
    if array.dtype.itemsize not in (4, 8) or not array.flags.c_contiguous:
        return int(np.count_nonzero(array))
    bits = array.view(np.uint32 if array.dtype.itemsize == 4 else np.uint64)
    return int(np.count_nonzero(bits << np.array(1, bits.dtype)))


def sparse_dual_pointmap(dpm: np.ndarray | SparseDualPointMap, dtype: str = "float16"
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Split a dual point map into hit counts and hit values (see the module docstring).

    Args:
        dpm: (H, W, L, 7) float array, CPU, scene units: canonical xyz, posed xyz, alpha; alpha is 0 or 1,
            layer l hit implies layers < l hit, and every channel of a missed entry is 0. L <= 255. Or a
            `SparseDualPointMap`, only checked and cast.
        dtype: "float16" or "float32", the stored precision of the values.
    Returns:
        counts (H, W) uint8 and values (M, 6) of `dtype`.
    Raises:
        EncodingError: wrong shape, alpha not 0/1 or not layer-prefix, non-zero channels where alpha is 0,
            values that are not finite or beyond the range of `dtype`.
    """
    if dtype not in PRECISIONS:
        raise EncodingError(f"dual point map precision must be one of {PRECISIONS}, got {dtype!r}")
    limit = _FLOAT16_MAX if dtype == "float16" else np.inf
    if isinstance(dpm, SparseDualPointMap):  # already split: only checked and cast
        _check_sparse(dpm.counts, dpm.values, dpm.layers)
        if np.abs(dpm.values).max(initial=0.0) > limit:
            raise EncodingError(f"dual point map has values beyond +-{limit} ({dtype})")
        return dpm.counts, dpm.values.astype(dtype)
    if not isinstance(dpm, np.ndarray) or dpm.ndim != 4 or dpm.shape[3] != CHANNELS or dpm.dtype.kind != "f":
        shape = getattr(dpm, "shape", None)
        raise EncodingError(f"dual point map must be a float (H, W, L, 7) numpy array, got {shape}")
    h, w, layers, _ = dpm.shape
    if not (h > 0 and w > 0 and 0 < layers <= MAX_LAYERS):
        raise EncodingError(f"dual point map shape {dpm.shape} out of range (L <= {MAX_LAYERS})")
    flat = dpm.reshape(h * w, layers, CHANNELS)
    alpha = np.ascontiguousarray(flat[:, :, ALPHA])  # (H*W, L): one strided gather, then fast scans
    hit = alpha == 1.0  # (H*W, L)
    # alpha is 0 or 1 (every non-zero alpha is a hit), and a hit has every layer in front of it hit
    if np.count_nonzero(hit) != _nonzero(alpha) or (hit[:, 1:] > hit[:, :-1]).any():
        raise EncodingError(
            "dual point map alpha must be 0 or 1, and a layer hit implies all layers in front hit"
        )
    counts = hit.view(np.uint8) @ np.ones(layers, np.uint8)  # (H*W,) hits per pixel (L <= 255: no overflow)
    layer, pixel = hit_order(counts, layers)
    values = flat[pixel, layer, POINTS]  # (M, 6)
    # Everything non-zero must be a hit's value or alpha, else the sparse form would not give `dpm` back.
    if _nonzero(flat) != _nonzero(values) + len(pixel):
        raise EncodingError("dual point map has non-zero values where alpha is 0")
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > limit:
        raise EncodingError(f"dual point map has values that are not finite or beyond +-{limit} ({dtype})")
    return counts.reshape(h, w), values.astype(dtype)


def dense_dual_pointmap(counts: np.ndarray, values: np.ndarray, layers: int) -> np.ndarray:
    """The dense map of `sparse_dual_pointmap`'s output.

    Args:
        counts: (H, W) uint8 hits per pixel; values: (M, 6) float, M = counts.sum(); layers: L.
    Returns:
        (H, W, L, 7) float32 array, CPU: canonical xyz, posed xyz, alpha (1 on hits, else all 0).
    Raises:
        EncodingError: counts and values that do not fit together or with `layers`, non-finite values.
    """
    _check_sparse(counts, values, layers)
    h, w = counts.shape
    layer, pixel = hit_order(counts, layers)
    out = np.zeros((h * w, layers, CHANNELS), np.float32)
    out[pixel, layer, POINTS] = values
    out[pixel, layer, ALPHA] = 1.0
    return out.reshape(h, w, layers, CHANNELS)


def dpm_npz(counts: np.ndarray, values: np.ndarray, layers: int) -> bytes:
    """An npz (zip, deflate; what `np.load` and WebDataset's default decoder read) of a sparse map:
    members `counts`, `values` and `shape` = (H, W, L, 7) int64. Same input, same bytes."""
    buffer = io.BytesIO()
    arrays = {"counts": counts, "values": values, "shape": np.array([*counts.shape, layers, 7], np.int64)}
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_NPZ_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_dpm_npz(data: bytes) -> tuple[np.ndarray, np.ndarray, int]:
    """(counts, values, layers) from `dpm_npz` bytes. EncodingError if they do not decode (zip CRCs
    catch flipped bytes)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            counts, values, shape = npz["counts"], npz["values"], npz["shape"]
    except (ValueError, OSError, EOFError, KeyError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as err:
        raise EncodingError(f"dual point map npz does not decode ({err})") from err
    layers_ok = shape.shape == (4,) and 0 < shape[2] <= MAX_LAYERS and shape[3] == 7
    if not layers_ok or tuple(shape[:2]) != counts.shape:
        raise EncodingError(f"dual point map npz: shape {shape.tolist()} disagrees with counts {counts.shape}")
    return counts, values, int(shape[2])


def baseline_npz_bytes(dpm: np.ndarray) -> int:
    """Size of the reference code's encoding of `dpm`, the benchmark's baseline.

    The reference stored float32 values of all 7 channels of every hit plus uint8 (row, col, layer)
    indices (uint16 when a dimension reaches 255) and the shape, in an uncompressed npz.

    Args:
        dpm: (H, W, L, 7) float array, CPU (as for `sparse_dual_pointmap`).
    """
    index = np.argwhere(dpm[..., ALPHA] != 0)  # (N, 3) row, col, layer
    index_dtype = np.uint8 if max(dpm.shape[:3]) < 255 else np.uint16
    buffer = io.BytesIO()
    np.savez(
        buffer,
        values=dpm[index[:, 0], index[:, 1], index[:, 2]].astype(np.float32),
        indices=index.astype(index_dtype),
        shape=np.array(dpm.shape),
    )
    return buffer.getbuffer().nbytes


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an image as PNG bytes (lossless).

    Args:
        image: (H, W) bool (stored 1-bit), (H, W) uint8 or uint16, or (H, W, 3 | 4) uint8, CPU.
    """
    ok = (image.ndim == 2 and image.dtype in (np.bool_, np.uint8, np.uint16)) or (
        image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8
    )
    if not ok:
        raise EncodingError(f"cannot store a {image.dtype} array of shape {image.shape} as PNG")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG (or any image PIL reads) bytes to a numpy array as stored (`dualpm.images.image_array`)."""
    try:
        return image_array(open_image(data, "image bytes"))
    except DatasetError as err:
        raise EncodingError(f"image bytes do not decode ({err.__cause__})") from err


def rgb8(data: bytes, where: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file's bytes: `dualpm.images.rgb_array` (grey repeated, 16-bit
    scaled, transparency over black) at 8 bits. DatasetError naming `where` if it does not decode."""
    rgb = rgb_array(open_image(data, where))  # (H, W, 3) float32 in [0, 1]
    return np.round(rgb * 255.0).astype(np.uint8)
