"""Field kinds: what a writer accepts, what each container stores, what every reader gets back.

    kind   writer takes                 WebDataset member       Zarr, per row                readers get
    dpm    (H, W, L, 7) float array*    .npz counts, values     counts (H, W), values (c, 6)  (H, W, L, 7) f32
    mask   (h, w) bool or 0/1 uint8     .png, 1-bit             (h, w) uint8                  (h, w) f32 0/1
    image  file bytes, or (h, w, 3) u8  .png (bytes as given)   (h, w, 3) uint8               (h, w, 3) uint8
    json   dict                         .json                   string (JSON text)            dict
    array  numpy array                  .npy                    (*shape) dtype                the array

*or a `SparseDualPointMap` (the same map already split into counts and values, as the CPU renderer
makes it).

`prepare_field` checks and converts a writer's value for one container; `StoredSample` holds a read
sample's raw fields and decodes each on first access, naming column, shard, sample and field in every
error (so skipping samples, e.g. when a resumed reader fast-forwards, costs no decoding). Masks decode
with `dualpm.masks`, images with `dualpm.images` (the one decoders).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from dualpm.errors import DatasetError
from dualpm.masks import decode_mask, read_mask
from dualpm.store.encoding import (
    EncodingError,
    SparseDualPointMap,
    dense_dual_pointmap,
    dpm_npz,
    png_bytes,
    read_dpm_npz,
    rgb8,
    sparse_dual_pointmap,
)
from dualpm.store.manifest import FieldSpec

# Float array fields (features: L2-normalised parts through a PCA basis, packed PNGs in [-1, 1]) hold a
# few units; anything beyond this, or not finite, is damaged data (the reader and `verify` refuse it).
ARRAY_LIMIT = 1000.0
EXTENSIONS = {"dpm": "npz", "mask": "png", "image": "png", "json": "json", "array": "npy"}  # WebDataset


def _check_shape(name: str, spec: FieldSpec, shape: tuple[int, ...], dtype: Any, where: str) -> None:
    if spec.shape is not None and tuple(shape) != spec.shape:
        raise DatasetError(f"{where}: field {name!r} has shape {tuple(shape)}, the column holds {spec.shape}")
    if spec.dtype is not None and spec.kind == "array" and np.dtype(dtype) != np.dtype(spec.dtype):
        raise DatasetError(
            f"{where}: field {name!r} has dtype {np.dtype(dtype)}, the column holds {spec.dtype}")


def prepare_field(name: str, spec: FieldSpec, value: Any, format: str, where: str) -> Any:
    """Check a writer's `value` against `spec` and convert it to what `format` stores.

    Returns bytes (WebDataset member contents), or for Zarr: the row's array, a str (json), or
    (counts, values) for a dual point map. Raises TypeError for values of the wrong type (a bug in the
    caller) and DatasetError / EncodingError for data that cannot be stored.
    """
    kind = spec.kind
    if kind == "json":
        if not isinstance(value, dict):
            raise TypeError(f"{where}: field {name!r} must be a dict, got {type(value).__name__}")
        try:
            text = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{where}: field {name!r} is not JSON-serialisable ({err})") from err
        return text.encode("utf-8") if format == "webdataset" else text
    if kind == "image" and isinstance(value, (bytes, bytearray, memoryview)):
        if format == "webdataset":
            return bytes(value)  # the file as found: no re-encoding, no quality change
        value = rgb8(bytes(value), f"{where}: field {name!r}")
    if kind == "dpm" and isinstance(value, SparseDualPointMap):  # the CPU renderer's form: already split
        counts, values = sparse_dual_pointmap(value, spec.dtype or "float16")
        _check_shape(name, spec, value.shape, None, where)
        return dpm_npz(counts, values, value.layers) if format == "webdataset" else (counts, values)
    if not isinstance(value, np.ndarray) or value.dtype.hasobject:
        raise TypeError(f"{where}: field {name!r} ({kind}) must be a numpy array of plain dtype")
    if kind == "dpm":
        counts, values = sparse_dual_pointmap(value, spec.dtype or "float16")
        _check_shape(name, spec, value.shape, None, where)
        return dpm_npz(counts, values, value.shape[2]) if format == "webdataset" else (counts, values)
    if kind == "mask":
        if value.ndim != 2 or value.dtype not in (np.bool_, np.uint8) or value.max(initial=0) > 1:
            raise DatasetError(f"{where}: field {name!r} must be an (h, w) bool or 0/1 uint8 mask")
        _check_shape(name, spec, value.shape, None, where)
        return png_bytes(value.astype(bool)) if format == "webdataset" else value.astype(np.uint8)
    if kind == "image":
        if value.ndim != 3 or value.shape[2] != 3 or value.dtype != np.uint8:
            raise DatasetError(
                f"{where}: field {name!r} must be (h, w, 3) uint8, got {value.dtype}{value.shape}")
        _check_shape(name, spec, value.shape, None, where)
        return png_bytes(value) if format == "webdataset" else value
    _check_shape(name, spec, value.shape, value.dtype, where)  # array
    if format == "zarr":
        return value
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def decode_field(name: str, spec: FieldSpec, raw: Any, where: str) -> Any:
    """A stored field as readers get it (see the module docstring); DatasetError naming `where` and the
    field when the stored data do not decode or do not match the column's spec."""
    kind = spec.kind
    if isinstance(raw, Exception):  # a Zarr chunk that failed its checksum when the row was read
        raise DatasetError(f"{where}: field {name!r} does not decode ({raw})")
    try:
        if kind == "dpm":
            if isinstance(raw, bytes):
                counts, values, layers = read_dpm_npz(raw)
            else:
                (counts, values), layers = raw, spec.shape[2]
            value = dense_dual_pointmap(counts, values, layers)
        elif kind == "mask":
            value = read_mask(raw, where) if isinstance(raw, bytes) else decode_mask(raw, where)
        elif kind == "image":
            value = rgb8(raw, where) if isinstance(raw, bytes) else raw
        elif kind == "json":
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        else:
            value = np.load(io.BytesIO(raw), allow_pickle=False) if isinstance(raw, bytes) else raw
    except (EncodingError, ValueError, UnicodeDecodeError, EOFError, OSError) as err:
        raise DatasetError(f"{where}: field {name!r} does not decode ({err})") from err
    except DatasetError as err:  # masks and images name `where` themselves
        raise DatasetError(f"{err} (field {name!r})") from err
    if kind != "json":
        _check_shape(name, spec, value.shape, value.dtype, where)
    return value


class StoredSample(Mapping[str, Any]):
    """One stored sample's fields, each decoded (`decode_field`) on first access and then kept.

    `raw` maps each field to its stored form, or to a zero-argument loader of it (read on first use).
    `where` names the column, shard and sample in error messages; `raw(name)` gives the stored form.
    """

    def __init__(self, raw: dict[str, Any], specs: Mapping[str, FieldSpec], where: str):
        self._raw, self._specs, self.where = raw, specs, where
        self._decoded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._decoded:
            self._decoded[name] = decode_field(name, self._specs[name], self.raw(name), self.where)
        return self._decoded[name]

    def __contains__(self, name: object) -> bool:  # without decoding (Mapping's would decode)
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def raw(self, name: str) -> Any:
        """The stored form of field `name` (a reader may hand a loader: a callable, called once here)."""
        if callable(self._raw[name]):
            self._raw[name] = self._raw[name]()
        return self._raw[name]
