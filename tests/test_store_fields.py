"""Field kinds: writer values checked and converted per container, decoded back the same, lazily."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dualpm.errors import DatasetError
from dualpm.store.encoding import SparseDualPointMap, png_bytes, sparse_dual_pointmap
from dualpm.store.fields import StoredSample, decode_field, prepare_field
from dualpm.store.manifest import FieldSpec

rng = np.random.default_rng(0)
DPM = np.zeros((4, 5, 3, 7), np.float32)
DPM[1, 2, :2] = [[0.5, -1, 2, 3, 4, -0.25, 1], [1, 1, 1, 1, 1, 1, 1]]
RGB = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
CASES = {
    "dpm": (FieldSpec("dpm", (4, 5, 3, 7), "float16"), DPM, DPM),
    "dpm sparse": (FieldSpec("dpm", (4, 5, 3, 7), "float16"), SparseDualPointMap(*sparse_dual_pointmap(DPM, "float32"), 3),
                   DPM),
    "mask": (FieldSpec("mask", (4, 5), "uint8"), DPM[..., 0, 6] > 0, DPM[..., 0, 6]),
    "image": (FieldSpec("image", (4, 5, 3), "uint8"), RGB, RGB),
    "image bytes": (FieldSpec("image", (4, 5, 3), "uint8"), png_bytes(RGB), RGB),
    "json": (FieldSpec("json"), {"b": [1, 2], "a": "ü"}, {"a": "ü", "b": [1, 2]}),
    "array": (FieldSpec("array", (2, 3), "float16"), np.arange(6, dtype=np.float16).reshape(2, 3),
              np.arange(6, dtype=np.float16).reshape(2, 3)),
}


@pytest.mark.parametrize("format", ["webdataset", "zarr"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_kind_round_trips_through_both_containers(case, format):
    spec, value, expected = CASES[case]
    stored = prepare_field("f", spec, value, format, "sample 's'")
    if format == "webdataset":
        assert isinstance(stored, bytes)  # a tar member's contents
    decoded = decode_field("f", spec, stored, "sample 's'")
    if spec.kind == "json":
        assert decoded == expected
    else:
        np.testing.assert_array_equal(decoded, expected)
        assert decoded.dtype == {"dpm": np.float32, "mask": np.float32}.get(spec.kind, expected.dtype)


@pytest.mark.parametrize("format", ["webdataset", "zarr"])
def test_a_sparse_map_stores_exactly_what_its_dense_map_stores(format):
    spec = CASES["dpm"][0]
    dense = prepare_field("f", spec, DPM, format, "s")
    sparse = prepare_field("f", spec, CASES["dpm sparse"][1], format, "s")
    if format == "webdataset":
        assert sparse == dense  # the same npz bytes
    else:
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(sparse, dense, strict=True))


def test_image_file_bytes_are_kept_as_they_are_in_webdataset():
    spec = FieldSpec("image", None, "uint8", required=False)
    data = png_bytes(RGB)
    assert prepare_field("rgb", spec, data, "webdataset", "w") == data
    np.testing.assert_array_equal(prepare_field("rgb", CASES["image"][0], data, "zarr", "w"), RGB)


@pytest.mark.parametrize(
    "case, value, error, message",
    [
        ("json", b"{}", TypeError, "must be a dict"),
        ("array", [1, 2], TypeError, "must be a numpy array"),
        ("array", np.zeros((2, 3), np.float32), DatasetError, "dtype float32, the column holds float16"),
        ("array", np.zeros((3, 2), np.float16), DatasetError, r"shape \(3, 2\), the column holds \(2, 3\)"),
        ("mask", np.full((4, 5), 2, np.uint8), DatasetError, "bool or 0/1 uint8"),
        ("image", np.zeros((4, 5), np.uint8), DatasetError, r"\(h, w, 3\) uint8"),
        ("dpm", np.zeros((4, 5, 2, 7), np.float32), DatasetError, r"shape \(4, 5, 2, 7\)"),
        ("dpm", SparseDualPointMap(np.zeros((4, 5), np.uint8), np.zeros((0, 6), np.float32), 2), DatasetError,
         r"shape \(4, 5, 2, 7\)"),
        ("dpm", SparseDualPointMap(np.ones((4, 5), np.uint8), np.zeros((3, 6), np.float32), 3), DatasetError,
         "20 hits, up to 1 per pixel"),
        ("dpm", SparseDualPointMap(np.ones((4, 5), np.uint8), np.full((20, 6), 7e4, np.float32), 3), DatasetError,
         "beyond"),
    ],
)
def test_writer_values_are_checked(case, value, error, message):
    with pytest.raises(error, match=message):
        prepare_field("f", CASES[case][0], value, "zarr", "sample 's'")


def test_decoding_errors_name_the_sample_and_field():
    where = "OUT/render shard 3 sample 'x.y'"
    with pytest.raises(DatasetError, match=r"^OUT/render shard 3 sample 'x.y': field 'dpm' does not decode"):
        decode_field("dpm", CASES["dpm"][0], b"PK\x03\x04 not a zip", where)
    with pytest.raises(DatasetError, match=r"sample 'x.y': field 'meta' does not decode \(not a JSON object\)"):
        decode_field("meta", FieldSpec("json"), "[1]", where)
    with pytest.raises(DatasetError, match=r"sample 'x.y'.*mask values are neither binary.*\(field 'mask'\)"):
        decode_field("mask", CASES["mask"][0], np.array([[0, 9, 70, 1, 3]] * 4, np.uint8), where)
    with pytest.raises(DatasetError, match=r"sample 'x.y': field 'f' does not decode \(checksum\)"):
        decode_field("f", CASES["array"][0], ValueError("checksum"), where)  # a damaged Zarr chunk
    with pytest.raises(DatasetError, match=r"field 'dpm' has shape \(4, 5, 2, 7\), the column holds"):
        spec = FieldSpec("dpm", (4, 5, 2, 7), "float16")
        decode_field("dpm", CASES["dpm"][0], prepare_field("dpm", spec, DPM[:, :, :2], "webdataset", where), where)


def test_stored_samples_decode_each_field_once_and_only_when_asked():
    calls = []

    def loader():
        calls.append(1)
        return json.dumps({"k": 1})

    sample = StoredSample({"meta": loader, "x": b"not npy"}, {"meta": FieldSpec("json"), "x": FieldSpec("array")},
                          "where")
    assert "meta" in sample and "y" not in sample and sorted(sample) == ["meta", "x"] and len(sample) == 2
    assert calls == []  # membership, iteration and length decode nothing
    assert sample["meta"] == {"k": 1} and sample["meta"] is sample["meta"] and calls == [1]
    assert sample.get("missing") is None
    with pytest.raises(DatasetError, match="where: field 'x' does not decode"):
        sample["x"]
