"""Low-level glTF 2.0 reading: the JSON document, buffers, images' bytes and accessors.

Shared by `dualpm.gltf` (the skinned mesh), `dualpm.gltf_material` (materials and textures) and
`dualpm.animation` (animation clips). Everything a broken or hostile file can get wrong raises
`GltfError` naming the file: GLB headers, URIs (data: URIs or relative files beside the glTF, never
escaping its folder), offsets and strides of accessors.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import struct
import urllib.parse
from pathlib import Path

import numpy as np
import pygltflib
import torch

from dualpm.errors import GltfError
from dualpm.fileio import UnsafePathError, safe_join
from dualpm.geometry import matrix_to_quaternion

# glTF componentType -> little-endian NumPy dtype; accessor type -> number of components.
COMPONENT_DTYPES = {
    5120: np.dtype("<i1"), 5121: np.dtype("<u1"), 5122: np.dtype("<i2"),
    5123: np.dtype("<u2"), 5125: np.dtype("<u4"), 5126: np.dtype("<f4"),
}
TYPE_SIZES = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4, "MAT4": 16}
BYTE, UBYTE, SHORT, USHORT, UINT, FLOAT = 5120, 5121, 5122, 5123, 5125, 5126
TRIANGLES = 4
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963


def read_document(path: Path) -> tuple[pygltflib.GLTF2, bytes | None]:
    """Parse the JSON part (and, for .glb, find the binary chunk)."""
    if not path.is_file():
        raise GltfError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".gltf", ".glb"):
        raise GltfError(f"{path}: not a glTF file (expected suffix .gltf or .glb)")
    data = path.read_bytes()
    if suffix == ".glb":
        if len(data) < 20 or data[:4] != b"glTF":
            raise GltfError(f"{path}: not a glTF binary file (bad GLB header)")
        version, length = struct.unpack("<II", data[4:12])
        json_length, json_type = struct.unpack("<I4s", data[12:20])
        if version != 2 or length > len(data) or json_type != b"JSON" or 20 + json_length > length:
            raise GltfError(f"{path}: not a glTF 2.0 binary file (bad GLB header or truncated file)")
        text, rest = data[20 : 20 + json_length], data[20 + json_length : length]
        blob = None
        if len(rest) >= 8:  # optional BIN chunk right after the JSON chunk
            bin_length, bin_type = struct.unpack("<I4s", rest[:8])
            if bin_type == b"BIN\x00":
                if 8 + bin_length > len(rest):
                    raise GltfError(f"{path}: GLB binary chunk is truncated")
                blob = rest[8 : 8 + bin_length]
    else:
        text, blob = data, None
    try:
        raw = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GltfError(f"{path}: not a glTF file (invalid JSON: {err})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("asset"), dict):
        raise GltfError(f"{path}: not a glTF file (no 'asset' object)")
    if not str(raw["asset"].get("version", "")).startswith("2."):
        raise GltfError(f"{path}: glTF version {raw['asset'].get('version')!r} is not supported (need 2.x)")
    try:
        doc = pygltflib.GLTF2.gltf_from_json(json.dumps(raw))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise GltfError(f"{path}: malformed glTF JSON ({type(err).__name__}: {err})") from err
    return doc, blob



def read_gltf_document(path: str | os.PathLike) -> tuple[pygltflib.GLTF2, list[bytes]]:
    """The parsed document of a .gltf/.glb and the bytes of each of its buffers (validated as
    `load_skinned_mesh` does: GLB header, JSON, buffer URIs inside the file's folder or data: URIs).
    For writers that add to a user's document rather than rebuild it (`dualpm.animate`)."""
    path = Path(path)
    doc, blob = read_document(path)
    return doc, [buffer_bytes(doc, i, blob, path) for i in range(len(doc.buffers))]

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")


def uri_bytes(uri: str, path: Path, what: str) -> bytes:
    """Bytes behind a glTF `uri`: a base64 data: URI, or a file beside `path` (never outside its folder).

    `what` names the referring object in errors (e.g. "buffer 0", "image 2").
    """
    if uri.startswith("data:"):
        header, sep, payload = uri.partition(",")
        if not sep or not header.endswith(";base64"):
            raise GltfError(f"{path}: {what} data: URI is not base64-encoded")
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error as err:
            raise GltfError(f"{path}: {what} data: URI has invalid base64 ({err})") from err
    scheme = _SCHEME_RE.match(uri)
    if scheme and len(scheme.group(1)) > 1:  # one letter is a Windows drive: refused by safe_join
        raise GltfError(f"{path}: {what} uri {uri[:60]!r} uses URL scheme {scheme.group(1)!r}; "
                        "only relative file paths and data: URIs are supported")
    try:
        file = safe_join(path.parent, urllib.parse.unquote(uri))
    except UnsafePathError as err:
        raise GltfError(f"{path}: {what}: {err}") from err
    if not file.is_file():
        raise GltfError(f"{path}: {what} file {uri!r} not found")
    return file.read_bytes()


def buffer_bytes(doc: pygltflib.GLTF2, index: int, blob: bytes | None, path: Path) -> bytes:
    """Bytes of buffer `index`: the GLB chunk, a base64 data: URI, or a file beside the glTF."""
    buffer = doc.buffers[index]
    if buffer.uri is None:
        if blob is None or index != 0:
            raise GltfError(f"{path}: buffer {index} has no uri and there is no GLB binary chunk for it")
        data = blob
    else:
        data = uri_bytes(buffer.uri, path, f"buffer {index}")
    if buffer.byteLength is None or len(data) < buffer.byteLength:
        raise GltfError(
            f"{path}: buffer {index} holds {len(data)} bytes, less than its byteLength {buffer.byteLength}"
        )
    return data


def buffer_view_bytes(doc: pygltflib.GLTF2, buffers: list[bytes], index: int, path: Path, what: str) -> bytes:
    """The bytes of bufferView `index` (an embedded image, for instance), bounds checked."""
    if not 0 <= index < len(doc.bufferViews):
        raise GltfError(f"{path}: {what} refers to missing bufferView {index}")
    view = doc.bufferViews[index]
    if view.buffer is None or not 0 <= view.buffer < len(buffers):
        raise GltfError(f"{path}: bufferView {index} refers to missing buffer {view.buffer}")
    start, length = view.byteOffset or 0, view.byteLength or 0
    if start < 0 or start + length > len(buffers[view.buffer]):
        raise GltfError(f"{path}: {what}: bufferView {index} reads outside its buffer")
    return buffers[view.buffer][start : start + length]


def read_accessor(
    doc: pygltflib.GLTF2,
    buffers: list[bytes],
    index: int | None,
    what: str,
    allowed: dict[str, set[int]],
    path: Path,
) -> np.ndarray:
    """Decode accessor `index` to a (count, components) array of its stored dtype.

    Normalised integer accessors are converted to float32 in [0, 1]. `allowed` maps accessor
    types to the component types accepted for this use.
    """
    if index is None or not 0 <= index < len(doc.accessors):
        raise GltfError(f"{path}: {what} accessor {index} does not exist")
    acc = doc.accessors[index]
    if acc.type not in allowed or acc.componentType not in allowed[acc.type]:
        raise GltfError(
            f"{path}: {what} accessor has type {acc.type} / componentType {acc.componentType}; "
            f"expected one of {({t: sorted(c) for t, c in allowed.items()})}"
        )
    if acc.sparse is not None:
        raise GltfError(f"{path}: {what} accessor is sparse; sparse accessors are not supported")
    dtype, comps, count = COMPONENT_DTYPES[acc.componentType], TYPE_SIZES[acc.type], acc.count or 0
    if acc.bufferView is None:  # glTF: an accessor without a bufferView is all zeros
        values = np.zeros((count, comps), dtype=dtype)
    else:
        if not 0 <= acc.bufferView < len(doc.bufferViews):
            raise GltfError(f"{path}: {what} accessor refers to missing bufferView {acc.bufferView}")
        view = doc.bufferViews[acc.bufferView]
        if view.buffer is None or not 0 <= view.buffer < len(buffers):
            raise GltfError(f"{path}: bufferView {acc.bufferView} refers to missing buffer {view.buffer}")
        data = buffers[view.buffer]
        element = dtype.itemsize * comps
        stride = view.byteStride or element
        view_start, view_length = view.byteOffset or 0, view.byteLength or 0
        start = view_start + (acc.byteOffset or 0)
        end = start + stride * (count - 1) + element if count else start
        bad_offsets = min(view_start, acc.byteOffset or 0) < 0 or stride < element
        if bad_offsets or view_start + view_length > len(data) or end > view_start + view_length:
            raise GltfError(f"{path}: {what} accessor reads outside its bufferView/buffer (bad offsets)")
        # One strided view over the raw bytes (works for interleaved and unaligned data), then copy.
        strides = (stride, dtype.itemsize)
        values = np.ndarray((count, comps), dtype=dtype, buffer=data, offset=start, strides=strides).copy()
    if acc.normalized and dtype.kind == "u":
        values = values.astype(np.float32) / np.float32(np.iinfo(dtype).max)
    elif acc.normalized and dtype.kind == "i":  # glTF: max(c / (2^(b-1) - 1), -1)
        values = np.maximum(values.astype(np.float32) / np.float32(np.iinfo(dtype).max), np.float32(-1))
    return values


def decompose(values: list[float], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a column-major affine 4x4 into translation, wxyz rotation and positive scale."""
    if len(values) != 16:
        raise GltfError(f"{where}: has {len(values)} values, expected 16")
    m = np.asarray(values, dtype=np.float64).reshape(4, 4).T  # column-major -> rows
    if not np.isfinite(m).all():
        raise GltfError(f"{where}: has NaN or infinite values")
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6):
        raise GltfError(f"{where}: last row {m[3].tolist()} is not [0 0 0 1] (not affine)")
    linear = m[:3, :3]
    if np.linalg.det(linear) <= 0:
        raise GltfError(f"{where}: has a negative (or zero) determinant; mirrored nodes are not supported")
    scale = np.linalg.norm(linear, axis=0)  # columns of R @ diag(s) have lengths s
    rot = linear / scale
    if not np.allclose(rot.T @ rot, np.eye(3), atol=1e-4):
        raise GltfError(f"{where}: has shear; only translation, rotation and scale are supported")
    quat = matrix_to_quaternion(torch.from_numpy(rot)).numpy()
    return m[:3, 3], quat, scale
