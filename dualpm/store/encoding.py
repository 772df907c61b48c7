"""Sparse encoding of one dual point map, and PNG helpers for masks and images.

A dense dual point map `(H, W, L, 7)` is mostly empty (background pixels, missing deeper layers), so
only hits are stored. Layers are depth-peeled, so a pixel's hits are always layers 0..k-1: one
per-pixel hit count says which entries are hit, and alpha is implied.

Byte layout (little endian), version 1::

    header  "<4sHHHHIIII": magic b"DPMS", version, H, W, L, n_hits, counts_len, values_len,
            crc32 (of the header before it and the two blocks that follow)
    counts  Blosc(zstd) of the (H*W,) uint8 hit counts, raster order
    values  Blosc(zstd, byte shuffle) of the delta-coded uint16 bit patterns of the float16
            values, as 6 planes (canonical x, y, z, posed x, y, z) of n_hits each; hits are
            ordered layer-major, then raster order, so neighbouring values lie on the same
            surface and their deltas are small

Measured on analytic renders of 3 overlapping spheres (160x160, 8 layers, 6 hit, ~19k hits): 91 kB,
15.5% of the reference code's npz (float32 values of all 7 channels + uint8 indices, 585 kB);
~8 ms to encode (half of it zstd) and ~1.5 ms to decode on one CPU core. The CRC catches any
flipped byte before decompression runs.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from numcodecs import Blosc, Delta
from PIL import Image

from dualpm.errors import DatasetError
from dualpm.images import image_array, open_image

MAGIC = b"DPMS"
VERSION = 1
MAX_LAYERS = 255  # hit counts are uint8
_HEADER = struct.Struct("<4sHHHHIIII")
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# Blosc picks the zstd level from clevel; 5 is the knee of size vs encode time (9 is 12x slower
# for 7% fewer bytes).
_BLOSC = Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE)
_DELTA = Delta(dtype="<u2")


class EncodingError(DatasetError):
    """A dual point map or image that cannot be encoded, or stored bytes that do not decode."""


def _compress(array: np.ndarray) -> bytes:
    return _BLOSC.encode(array) if array.size else b""


def _decompress(block: bytes, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    out = np.zeros(count, dtype)
    if count == 0:
        if block:
            raise EncodingError(f"dual point map: {what} block has {len(block)} bytes, expected none")
        return out
    # Blosc header: nbytes (uncompressed size) at offset 4. Refuse a mismatch before decompressing.
    if len(block) < 16 or struct.unpack_from("<I", block, 4)[0] != out.nbytes:
        raise EncodingError(f"dual point map: {what} block does not hold {out.nbytes} bytes")
    try:
        _BLOSC.decode(block, out=out)
    except (RuntimeError, ValueError) as err:
        raise EncodingError(f"dual point map: {what} block does not decompress ({err})") from err
    return out


def encode_dual_pointmap(dpm: np.ndarray) -> bytes:
    """Encode one dual point map to compact bytes (float16 values of hits only).

    Args:
        dpm: (H, W, L, 7) float array, CPU, scene units: canonical xyz, posed xyz, alpha; alpha is
            0 or 1, layer l hit implies layers < l hit, and every channel of a missed entry is 0.
            H, W < 65536; L <= 255.
    Returns:
        Bytes that `decode_dual_pointmap` turns back into the map, exact up to float16 rounding.
    Raises:
        EncodingError: wrong shape, alpha not 0/1 or not layer-prefix, non-zero channels where alpha
            is 0, values that are not finite or out of float16 range.
    """
    if not isinstance(dpm, np.ndarray) or dpm.ndim != 4 or dpm.shape[3] != 7 or dpm.dtype.kind != "f":
        shape = getattr(dpm, "shape", None)
        raise EncodingError(f"dual point map must be a float (H, W, L, 7) numpy array, got {shape}")
    h, w, layers, _ = dpm.shape
    if not (0 < h < 65536 and 0 < w < 65536 and 0 < layers <= MAX_LAYERS):
        raise EncodingError(f"dual point map shape {dpm.shape} out of range (H, W < 65536, L <= 255)")
    flat = dpm.reshape(h * w, layers, 7)
    alpha = flat[:, :, 6]  # (H*W, L)
    counts = np.count_nonzero(alpha, axis=1).astype(np.uint8)  # (H*W,)
    hit = np.arange(layers)[None, :] < counts[:, None]  # (H*W, L): the layer prefix the counts imply
    if not np.array_equal(hit, alpha == 1.0):
        raise EncodingError(
            "dual point map alpha must be 0 or 1, and a layer hit implies all layers in front hit"
        )
    layer, pixel = np.nonzero(hit.T)  # layer-major, then raster order
    values = flat[pixel, layer, :6]  # (N, 6)
    # Everything non-zero must be a hit's value or alpha, else decoding would not give `dpm` back.
    if np.count_nonzero(flat) != np.count_nonzero(values) + len(pixel):
        raise EncodingError("dual point map has non-zero values where alpha is 0")
    if not np.isfinite(values).all() or np.abs(values).max(initial=0.0) > _FLOAT16_MAX:
        raise EncodingError(f"dual point map has values that are not finite or beyond +-{_FLOAT16_MAX}")
    planes = np.ascontiguousarray(values.T.astype(np.float16)).view(np.uint16)  # (6, N)
    counts_block = _compress(counts)
    values_block = _compress(_DELTA.encode(planes)) if planes.size else b""
    header = _HEADER.pack(MAGIC, VERSION, h, w, layers, len(pixel), len(counts_block), len(values_block), 0)
    return _with_crc(header + counts_block + values_block)


def _crc(data: bytes) -> int:
    # Everything but the crc field itself (the last 4 bytes of the header).
    return zlib.crc32(data[_HEADER.size :], zlib.crc32(data[: _HEADER.size - 4]))


def _with_crc(data: bytes) -> bytes:
    return data[: _HEADER.size - 4] + _crc(data).to_bytes(4, "little") + data[_HEADER.size :]


def decode_dual_pointmap(data: bytes) -> np.ndarray:
    """Decode bytes from `encode_dual_pointmap`.

    Returns:
        (H, W, L, 7) float32 array, CPU: canonical xyz, posed xyz, alpha (1 on hits, else all 0).
    Raises:
        EncodingError: not a dual point map, a newer version, truncated or corrupt bytes.
    """
    data = bytes(data)
    if len(data) < _HEADER.size or data[:4] != MAGIC:
        raise EncodingError("not an encoded dual point map (bad magic or too short)")
    _, version, h, w, layers, n_hits, counts_len, values_len, crc = _HEADER.unpack_from(data)
    if version != VERSION:
        raise EncodingError(f"dual point map encoding version {version} is not supported (this is {VERSION})")
    if not (h and w and 0 < layers <= MAX_LAYERS) or n_hits > h * w * layers:
        raise EncodingError(f"dual point map header is corrupt ({h}x{w}x{layers}, {n_hits} hits)")
    if len(data) != _HEADER.size + counts_len + values_len:
        raise EncodingError(
            f"dual point map is {len(data)} bytes, header says {_HEADER.size + counts_len + values_len}"
            " (truncated or corrupt)"
        )
    if _crc(data) != crc:
        raise EncodingError("dual point map checksum mismatch (corrupt bytes)")
    counts_block = data[_HEADER.size : _HEADER.size + counts_len]
    values_block = data[_HEADER.size + counts_len :]
    counts = _decompress(counts_block, np.uint8, h * w, "counts")
    if counts.max(initial=0) > layers or int(counts.sum()) != n_hits:
        raise EncodingError("dual point map hit counts disagree with the header")
    deltas = _decompress(values_block, np.uint16, 6 * n_hits, "values")
    values = _DELTA.decode(deltas).view(np.float16).reshape(6, n_hits)  # (6, N)
    layer, pixel = np.nonzero(np.arange(layers)[:, None] < counts[None, :])  # same order as encoding
    out = np.zeros((h * w, layers, 7), np.float32)
    out[pixel, layer, :6] = values.T
    out[pixel, layer, 6] = 1.0
    return out.reshape(h, w, layers, 7)

def baseline_npz_bytes(dpm: np.ndarray) -> int:
    """Size of the reference code's encoding of `dpm`, the benchmark's baseline.

    The reference stored float32 values of all 7 channels of every hit plus uint8 (row, col, layer)
    indices (uint16 when a dimension reaches 255) and the shape, in an uncompressed npz.

    Args:
        dpm: (H, W, L, 7) float array, CPU (as for `encode_dual_pointmap`).
    """
    index = np.argwhere(dpm[..., 6] != 0)  # (N, 3) row, col, layer
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
