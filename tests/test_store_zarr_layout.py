"""The Zarr side of a store: arrays per field kind, chunking, metadata written by the driver only when it
changes, shard files encoded in memory."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from dualpm.store.manifest import SCHEMA_VERSION, ColumnInfo, FieldSpec, Manifest, plan_shards
from dualpm.store.zarr_layout import (
    CHUNK_BYTES,
    ArraySpec,
    array_specs,
    dpm_capacity,
    encode_shard,
    publish_layout,
    shard_keys,
    shard_size,
)

FIELDS = {
    "dpm": FieldSpec("dpm", (160, 160, 8, 7), "float16"),
    "mask": FieldSpec("mask", (256, 256), "uint8"),
    "rgb": FieldSpec("image", (256, 256, 3), "uint8"),
    "meta": FieldSpec("json"),
    "features": FieldSpec("array", (64, 60, 60), "float16"),
}


def test_arrays_of_each_kind():
    specs = {s.path: s for s in array_specs(FIELDS)}
    assert list(specs) == ["valid", "dpm/counts", "dpm/values", "mask", "rgb", "meta", "features"]
    assert (specs["dpm/counts"].shape, specs["dpm/counts"].dtype) == ((160, 160), "uint8")
    assert specs["dpm/values"].shape == (160 * 160 * 8, 6) and specs["dpm/values"].chunk == (4096, 6)
    assert specs["rgb"].shape == (256, 256, 3) and specs["meta"].dtype == "str"
    assert specs["features"].dims == ("channel", "grid_row", "grid_col")
    assert dpm_capacity((100, 100, 8, 7)) == (81920, 4096)  # rounded up to whole chunks
    assert dpm_capacity((4, 4, 2, 7)) == (32, 32)
    with pytest.raises(ValueError, match="needs its shape and dtype"):
        array_specs({"x": FieldSpec("array")})


@pytest.mark.parametrize("path, shard, rows", [
    ("dpm/counts", 256, 8),  # 25.6 kB rows: 8 per 256 KiB chunk, dividing 256
    ("dpm/values", 256, 4),  # 48 kB per chunk of hits
    ("mask", 256, 4), ("rgb", 256, 1), ("features", 256, 1),  # big rows: one sample per chunk
    ("dpm/counts", 3, 3), ("dpm/counts", 97, 1), ("meta", 64, 16),
])
def test_chunks_hold_several_small_samples_and_divide_the_shard(path, shard, rows):
    spec = next(s for s in array_specs(FIELDS) if s.path == path)
    assert spec.chunk_rows(shard) == rows
    assert shard % rows == 0 and (rows == 1 or rows * np.prod(spec.chunk) <= CHUNK_BYTES)


def small_manifest(fmt: str = "zarr", fields=None) -> Manifest:
    manifest = Manifest.create("src", 4, plan_shards({"train": ["a", "b.c", "d", "e", "f"], "val": ["v"]}, 4))
    fields = fields or {"dpm": FieldSpec("dpm", (8, 8, 3, 7), "float16"), "meta": FieldSpec("json")}
    manifest.columns["render"] = ColumnInfo("render", fmt, SCHEMA_VERSION, {}, fields)
    return manifest


def mtimes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_publish_layout_writes_the_hierarchy_once(tmp_path):
    manifest = small_manifest()
    publish_layout(tmp_path, manifest)
    root = zarr.open(tmp_path, mode="r")
    assert root["ids"][:].tolist() == ["a", "b.c", "d", "e", "f", "", "", "", "v", "", "", ""]
    assert root["render/dpm/values"].shape == (12, 192, 6) and root["render/dpm/values"].shards == (4, 192, 6)
    assert root["render/valid"].chunks == (4,) and not root["render/valid"][:].any()
    assert root["render/dpm/counts"].metadata.dimension_names == ("sample", "row", "col")
    assert root.attrs["dualpm"] == json.loads(json.dumps(manifest.schema()))
    assert root["render"].attrs["dualpm"]["format"] == "zarr"
    assert "consolidated_metadata" in json.loads((tmp_path / "zarr.json").read_text())
    assert shard_size(tmp_path / "render") == 4
    before = mtimes(tmp_path)
    publish_layout(tmp_path, manifest)  # nothing changed: nothing rewritten (a rerun must not race readers)
    assert mtimes(tmp_path) == before


def test_a_new_layout_replaces_the_arrays_and_a_tar_column_leaves_no_zarr_nodes(tmp_path):
    publish_layout(tmp_path, small_manifest())
    wider = small_manifest(fields={"dpm": FieldSpec("dpm", (8, 8, 4, 7), "float32"), "meta": FieldSpec("json")})
    publish_layout(tmp_path, wider)
    values = zarr.open(tmp_path, mode="r")["render/dpm/values"]
    assert values.dtype == np.float32 and values.shape == (12, 256, 6)
    (tmp_path / "render" / "shard-000000.tar").write_bytes(b"")  # as if the column were rendered again as tars
    publish_layout(tmp_path, small_manifest("webdataset"))
    assert os.listdir(tmp_path / "render") == ["shard-000000.tar"]
    assert list(zarr.open(tmp_path, mode="r").group_keys()) == []


def test_encode_shard_gives_one_file_per_array_and_none_for_fill(tmp_path):
    spec = ArraySpec("x", (3,), (3,), "float32", 0, "shuffle", dims=("c",))
    files = encode_shard([spec], 4, {"x": np.array([[0, 0, 0], [1, 2, 3], [0, 0, 0], [0, 0, 0]], np.float32)})
    assert list(files) == ["x"] and shard_keys(spec, 7) == "c/7/0"
    group = zarr.open_group(tmp_path, mode="w", zarr_format=3)
    spec.create(group, 12, 4)
    (tmp_path / "x" / "c" / "2").mkdir(parents=True)
    (tmp_path / "x" / shard_keys(spec, 2)).write_bytes(files["x"])  # the shard file lands at its plan shard
    assert zarr.open_array(tmp_path / "x", mode="r")[8:12].tolist() == [[0, 0, 0], [1, 2, 3], [0, 0, 0], [0, 0, 0]]
    assert encode_shard([spec], 4, {"x": np.zeros((4, 3), np.float32)}) == {}  # all fill: no file
