"""Manifest: shard planning, JSON round trips, version checks, validation messages, sidecars."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dualpm import __version__
from dualpm.errors import ConfigError, DatasetError
from dualpm.store.manifest import (
    FAILURES_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ColumnInfo,
    Failure,
    FieldSpec,
    Manifest,
    ShardPlan,
    ShardRecord,
    check_sample_id,
    load_manifest,
    plan_shards,
    read_record,
    read_records,
    record_indices,
    record_path,
    save_manifest,
    write_failures,
    write_record,
)

SPLITS = {"train": [f"{i:06d}" for i in range(1, 11)], "val": ["v1", "v2", "v3"], "test": []}


def record(index: int, ids: tuple[str, ...], failures: tuple[Failure, ...] = ()) -> ShardRecord:
    return ShardRecord(index, len(ids), ids, failures, "ab" * 32, 1234, "webdataset", SCHEMA_VERSION)


def sample_manifest() -> Manifest:
    manifest = Manifest.create("/data/source", 4, plan_shards(SPLITS, 4))
    fields = {
        "dpm": FieldSpec("dpm", (160, 160, 8, 7), "float16", about={"units": "scene units"}),
        "rgb": FieldSpec("image", required=False),
        "meta": FieldSpec("json"),
    }
    manifest.columns["render"] = ColumnInfo("render", "webdataset", SCHEMA_VERSION, {"layers": 8}, fields)
    manifest.columns["render"].shards[0] = record(0, ("000001", "000003"), (Failure("000002", "no mesh"),))
    features = {"features": FieldSpec("array", (64, 40, 40), "float16")}
    manifest.columns["features"] = ColumnInfo("features", "zarr", SCHEMA_VERSION, {"channels": 64}, features)
    return manifest


def test_plan_shards_properties():
    plan = plan_shards(SPLITS, 4)
    assert [p.index for p in plan] == list(range(len(plan)))
    assert [(p.split, len(p.ids)) for p in plan] == [("train", 4), ("train", 4), ("train", 2), ("val", 3)]
    for split, ids in SPLITS.items():
        assert [i for p in plan if p.split == split for i in p.ids] == ids  # in order, nothing lost
    assert plan_shards(SPLITS, 4) == plan
    whole = (ShardPlan(0, "train", tuple(SPLITS["train"])), ShardPlan(1, "val", ("v1", "v2", "v3")))
    assert plan_shards(SPLITS, 100) == whole


@pytest.mark.parametrize(
    "splits, message",
    [
        ({"train": ["a", "b", "a"]}, "more than once"),
        ({"train": ["a"], "val": ["a"]}, "more than once"),
        ({"train": ["a/b"]}, "not valid"),
        ({"train": ["-a"]}, "not valid"),
        ({"train": [".."]}, "not valid"),
        ({"train": ["a b"]}, "not valid"),
        ({"tr/ain": ["a"]}, "split name"),
    ],
)
def test_plan_shards_refuses_bad_ids(splits, message):
    with pytest.raises(DatasetError, match=message):
        plan_shards(splits, 2)


@pytest.mark.parametrize("sample_id", ["a.b", "ünïcode", "x-y_z.1", "u\u0308nicode", "数据_1", "A" * 128, "3.14"])
def test_reasonable_ids_are_valid(sample_id):
    assert check_sample_id(sample_id, "test") == sample_id
    assert plan_shards({"train": [sample_id]}, 1)[0].ids == (sample_id,)


@pytest.mark.parametrize("sample_id", ["", ".", "..", ".hidden", "-lead", "_lead", "a/b", "a\\b", "a b", "tab\t",
                                       "new\nline", "a\n", "bad id$", "a%b", "A" * 129, 7, None])
def test_unreasonable_ids_are_refused(sample_id):
    with pytest.raises(DatasetError, match="is not valid"):
        check_sample_id(sample_id, "test")


def test_plan_shards_refuses_bad_shard_size():
    for size in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match="shard_size"):
            plan_shards(SPLITS, size)


def test_manifest_round_trip(tmp_path):
    manifest = sample_manifest()
    save_manifest(tmp_path, manifest)
    loaded = load_manifest(tmp_path)
    assert loaded == manifest
    assert loaded.tool_version == __version__ and loaded.schema_version == SCHEMA_VERSION
    assert loaded.columns["render"].fields["dpm"].shape == (160, 160, 8, 7)
    # The schema block says what the numbers mean; it is derived, so not read back.
    schema = json.loads((tmp_path / MANIFEST_NAME).read_text())["schema"]
    assert schema["format_version"] == SCHEMA_VERSION and schema["shard_size"] == 4
    assert schema["splits"] == {"train": [0, 3], "val": [3, 4]} and schema["rows"] == 16
    dpm = schema["columns"]["render"]["fields"]["dpm"]
    assert dpm["dtype"] == "float16" and dpm["units"] == "scene units" and "counts" in dpm["encoding"]
    assert "view[2, 3]" in schema["conventions"]["posed"]
    assert list(tmp_path.iterdir()) == [tmp_path / MANIFEST_NAME]  # no temporaries left
    assert "split_rule" not in manifest.to_json()  # optional: manifests without one stay as they were
    ruled = replace(manifest, split_rule={"rule": "train_benchmark.txt", "listed": 3})
    save_manifest(tmp_path, ruled)
    assert load_manifest(tmp_path) == ruled


def edited(tmp_path, edit) -> None:
    obj = sample_manifest().to_json()
    edit(obj)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(obj))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), "newer than this dualpm supports"),
        (lambda m: m.update(schema_version=0), "unknown schema version 0"),
        (lambda m: m.update(schema_version=1), "older dualpm .* into a new folder: `dualpm-prep render SRC NEW_OUT`"),
        (lambda m: m.pop("plan"), "missing field 'plan'"),
        (lambda m: m.update(shard_size="4"), r"\.shard_size: expected int"),
        (lambda m: m["plan"][1].update(index=5), r"plan\[1\]\.index: expected 1"),
        (lambda m: m["plan"][0]["ids"].append("x/y"), r"plan\[0\]\.ids\[4\]: sample id 'x/y'"),
        (lambda m: m["plan"][1]["ids"].append("000001"), "more than one shard"),
        (lambda m: m["columns"]["render"].update(format="hdf5"), r"columns\.render\.format: 'hdf5'"),
        (lambda m: m["columns"]["render"]["shards"]["0"].update(count=3), "count 3 but 2 ids"),
        (lambda m: m["columns"]["render"]["shards"]["0"].update(sha256="xyz"), "not a sha256"),
        (lambda m: m["columns"]["render"]["shards"].update({"1": m["columns"]["render"]["shards"]["0"]}),
         "holds the record of shard 0"),
        (lambda m: m["columns"]["render"]["fields"]["dpm"].update(shape=[1, "2"]), "non-negative integers"),
        (lambda m: m["columns"]["render"]["fields"]["dpm"].update(kind="blob"), r"dpm\.kind: 'blob'"),
        (lambda m: m["columns"].update({"../x": m["columns"]["render"]}), "column name"),
        (lambda m: m.update(split_rule=["val"]), r"\.split_rule: expected dict"),
    ],
)
def test_load_refuses_invalid_manifests_naming_file_and_field(tmp_path, edit, message):
    edited(tmp_path, edit)
    with pytest.raises(DatasetError, match=message) as info:
        load_manifest(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value)


def test_load_errors_for_missing_and_broken_files(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{ truncated")
    with pytest.raises(DatasetError, match="not readable JSON"):
        load_manifest(tmp_path)


def test_sidecars_round_trip_and_rebuild(tmp_path):
    records = {0: record(0, ("a", "b"), (Failure("c", "bad camera"),)), 3: record(3, ())}
    column = tmp_path / "render"
    for r in records.values():
        write_record(column, r)
    # Sidecars live outside the column's folder (the Zarr hierarchy): OUT/records/<column>/.
    assert record_path(column, 0) == tmp_path / "records" / "render" / "shard-000000.json"
    assert read_record(column, 0) == records[0] and read_record(column, 1) is None
    # A killed writer's temporary and unrelated files are not records.
    (tmp_path / "records" / "render" / ".tmp-shard-000001.json.k3j2").write_text("{")
    (tmp_path / "records" / "render" / "shard-000002.tar").write_bytes(b"")
    assert record_indices(column) == [0, 3]
    assert read_records(column) == records
    assert read_records(tmp_path / "missing") == {}
    record_path(column, 3).write_text(json.dumps(records[0].to_json()))
    with pytest.raises(DatasetError, match="holds the record of shard 0"):
        read_record(column, 3)
    record_path(column, 3).write_text(json.dumps(records[0].to_json() | {"ids": ["a", "c"]}))
    with pytest.raises(DatasetError, match="both as stored and as failed"):
        read_record(column, 3)


def test_write_failures(tmp_path):
    manifest = sample_manifest()
    failures = (Failure("v2", "nan features"), Failure("v3", "oom"))
    manifest.columns["features"].shards[3] = record(3, ("v1",), failures)
    assert write_failures(tmp_path, manifest) == 3
    lines = [json.loads(line) for line in (tmp_path / FAILURES_NAME).read_text().splitlines()]
    assert lines == [
        {"column": "render", "shard": 0, "id": "000002", "reason": "no mesh"},
        {"column": "features", "shard": 3, "id": "v2", "reason": "nan features"},
        {"column": "features", "shard": 3, "id": "v3", "reason": "oom"},
    ]
