"""Column shards (WebDataset tar, Zarr v3): round trips, atomicity, resume checks, integrity, unsafe tars, verify."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset

from dualpm.errors import DatasetError
from dualpm.fileio import LockedError
from dualpm.store.encoding import sparse_dual_pointmap
from dualpm.store.manifest import (
    SCHEMA_VERSION,
    ColumnInfo,
    FieldSpec,
    Manifest,
    ShardPlan,
    plan_shards,
    record_path,
    save_manifest,
)
from dualpm.store.shards import (
    ZARR_READ_ROWS,
    ShardWriter,
    check_shard,
    data_path,
    sample_id_from_key,
    read_shard,
    remove_shard,
    remove_temporaries,
    wds_key,
    shard_files,
    shard_status,
)
from dualpm.store.verify import verify_store
from dualpm.store.zarr_layout import publish_layout

H, W, L = 16, 12, 4
FORMATS = ["webdataset", "zarr"]
REPO = Path(__file__).parents[1]
FIELDS = {
    "dpm": FieldSpec("dpm", (H, W, L, 7), "float16"),
    "mask": FieldSpec("mask", (H, W), "uint8"),
    "rgb": FieldSpec("image", (H, W, 3), "uint8"),
    "meta": FieldSpec("json"),
    "feat": FieldSpec("array", (3, 4, 4), "float16"),
}


def random_dual_pointmap(rng: np.random.Generator) -> np.ndarray:
    """(H, W, L, 7) with an elliptic silhouette and 1..L depth-peeled hits per covered pixel."""
    row, col = np.mgrid[:H, :W]
    inside = ((row - H / 2) / (H / 3)) ** 2 + ((col - W / 2) / (W / 3)) ** 2 < 1
    counts = np.where(inside, rng.integers(1, L + 1, (H, W)), 0)
    dpm = rng.uniform(-1, 1, (H, W, L, 7)).astype(np.float32)
    dpm[..., 6] = 1
    dpm[np.arange(L) >= counts[..., None]] = 0
    return dpm


def sample_fields(rng: np.random.Generator, sample_id: str) -> dict:
    dpm = random_dual_pointmap(rng)
    return {
        "dpm": dpm,
        "mask": dpm[..., 0, 6] > 0,
        "rgb": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "meta": {"model_name": "horse", "focal_length": 50.0, "source_id": sample_id, "camera": np.eye(4).tolist()},
        "feat": rng.standard_normal((3, 4, 4)).astype(np.float16),
    }


def make_store(out: Path, ids, shard_size: int = 8, format: str = "zarr", name: str = "col",
               fields=FIELDS) -> tuple[Manifest, ColumnInfo]:
    """A manifest with one column (not saved) whose Zarr arrays exist (the driver's part)."""
    manifest = Manifest.create("synthetic", shard_size, plan_shards({"train": list(ids)}, shard_size))
    column = ColumnInfo(name, format, SCHEMA_VERSION, {}, dict(fields))
    manifest.columns[name] = column
    (out / name).mkdir(parents=True, exist_ok=True)  # as the stage runner does
    publish_layout(out, manifest)
    return manifest, column


def write_shard(out: Path, column: ColumnInfo, plan: ShardPlan, failed=(), seed=0, overwrite=False,
                ids=None):
    rng = np.random.default_rng(seed)
    samples = {i: sample_fields(rng, i) for i in (plan.ids if ids is None else ids) if i not in failed}
    with ShardWriter(out / column.name, plan, column.format, column.fields, overwrite=overwrite) as writer:
        for sample_id in plan.ids:
            if sample_id in failed:
                writer.fail(sample_id, f"{sample_id} has no mesh")
            elif sample_id in samples:
                writer.add(sample_id, samples[sample_id])
    column.shards[plan.index] = writer.record
    return writer.record, samples


def assert_same_sample(fields, expected) -> None:
    np.testing.assert_array_equal(fields["dpm"], expected["dpm"].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(fields["mask"], expected["mask"])
    np.testing.assert_array_equal(fields["rgb"], expected["rgb"])
    np.testing.assert_array_equal(fields["feat"], expected["feat"])
    assert fields["meta"] == expected["meta"] and fields["feat"].dtype == np.float16


def largest_data_file(folder: Path, index: int, format: str) -> Path:
    """The biggest data file of a shard: the place to damage."""
    return max((p for _, p in shard_files(folder, index, format)), key=lambda p: p.stat().st_size)


ODD_IDS = ["000001", "a.b", "ünïcode", "x-y_z.1", "u\u0308", "3.14"]


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_with_odd_ids(tmp_path, format):
    _, column = make_store(tmp_path, ODD_IDS, format=format)
    plan = ShardPlan(0, "train", tuple(ODD_IDS))
    record, samples = write_shard(tmp_path, column, plan, failed=["a.b"])
    kept = [i for i in ODD_IDS if i != "a.b"]
    assert record.ids == tuple(kept) and record.count == len(kept) and record.index == 0
    assert [(f.sample_id, f.reason) for f in record.failures] == [("a.b", "a.b has no mesh")]
    assert shard_status(tmp_path / "col", 0, format) == record
    read = list(read_shard(tmp_path, column, 0))
    assert [sample_id for sample_id, _ in read] == kept
    for sample_id, fields in read:
        assert sorted(fields) == sorted(FIELDS)
        assert fields["dpm"].dtype == np.float32 and fields["mask"].dtype == np.float32
        assert_same_sample(fields, samples[sample_id])


def test_webdataset_keys_escape_dots_and_standard_readers_decode_every_field(tmp_path):
    _, column = make_store(tmp_path, ODD_IDS, format="webdataset")
    _, samples = write_shard(tmp_path, column, ShardPlan(0, "train", tuple(ODD_IDS)))
    assert [wds_key(i) for i in ("a.b", "x-y_z.1", "a%b")] == ["a%2Eb", "x-y_z%2E1", "a%25b"]
    assert all(sample_id_from_key(wds_key(i)) == i for i in ODD_IDS + ["a%b.c%2E"])
    with tarfile.open(data_path(tmp_path / "col", 0)) as tar:
        names = tar.getnames()
    assert names[:5] == ["000001.dpm.npz", "000001.feat.npy", "000001.mask.png", "000001.meta.json",
                         "000001.rgb.png"]
    assert "a%2Eb.dpm.npz" in names and "x-y_z%2E1.meta.json" in names
    # WebDataset itself, with its default decoders, groups the members into the right samples.
    dataset = webdataset.WebDataset(str(data_path(tmp_path / "col", 0)), shardshuffle=False).decode("rgb8")
    seen = []
    for sample in dataset:
        sample_id = sample_id_from_key(sample["__key__"])
        seen.append(sample_id)
        expected = samples[sample_id]
        counts, values = sparse_dual_pointmap(expected["dpm"])
        np.testing.assert_array_equal(sample["dpm.npz"]["counts"], counts)
        np.testing.assert_array_equal(sample["dpm.npz"]["values"], values)
        np.testing.assert_array_equal(sample["feat.npy"], expected["feat"])
        assert sample["meta.json"] == expected["meta"]
        np.testing.assert_array_equal(sample["rgb.png"], expected["rgb"])
    assert seen == ODD_IDS


def test_zarr_reads_across_row_blocks(tmp_path):
    # Arrays are read ZARR_READ_ROWS samples per call: a shard spanning several blocks (with a partial last
    # one) must come back exactly, and each sample's array must own its data (not pin a whole block).
    ids = [f"s{i:03d}" for i in range(2 * ZARR_READ_ROWS + 5)]
    _, column = make_store(tmp_path, ids, shard_size=len(ids))
    _, samples = write_shard(tmp_path, column, ShardPlan(0, "train", tuple(ids)), failed=["s040"])
    read = list(read_shard(tmp_path, column, 0))
    assert [sample_id for sample_id, _ in read] == [i for i in ids if i != "s040"]
    for sample_id, fields in read:
        assert_same_sample(fields, samples[sample_id])
        assert fields["feat"].base is None and fields.raw("dpm")[1].base is None


@pytest.mark.parametrize("format", FORMATS)
def test_same_samples_give_the_same_checksum(tmp_path, format):
    plan = ShardPlan(0, "train", ("x1", "x2"))
    _, first_column = make_store(tmp_path / "a", plan.ids, format=format)
    _, second_column = make_store(tmp_path / "b", plan.ids, format=format)
    first, _ = write_shard(tmp_path / "a", first_column, plan)
    second, _ = write_shard(tmp_path / "b", second_column, plan)
    assert first.sha256 == second.sha256 and first.bytes == second.bytes


@pytest.mark.parametrize("format", FORMATS)
def test_empty_shard_of_failures_only(tmp_path, format):
    _, column = make_store(tmp_path, ["s1", "s2"], format=format)
    record, _ = write_shard(tmp_path, column, ShardPlan(0, "train", ("s1", "s2")), failed=["s1", "s2"])
    assert record.count == 0 and [f.sample_id for f in record.failures] == ["s1", "s2"]
    assert shard_status(tmp_path / "col", 0, format) == record
    assert list(read_shard(tmp_path, column, 0)) == []


@pytest.mark.parametrize("format", FORMATS)
def test_exception_inside_the_writer_publishes_nothing(tmp_path, format):
    _, column = make_store(tmp_path, ["s1"], format=format)
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(RuntimeError, match="render crashed"):
        with ShardWriter(tmp_path / "col", ShardPlan(0, "train", ("s1",)), format, FIELDS) as writer:
            writer.add("s1", sample_fields(np.random.default_rng(0), "s1"))
            raise RuntimeError("render crashed")
    assert sorted(p for p in tmp_path.rglob("*")) == before  # no data, no record, no temporaries
    assert shard_status(tmp_path / "col", 0, format) is None


@pytest.mark.parametrize("format", FORMATS)
def test_overwrite_rules(tmp_path, format):
    _, column = make_store(tmp_path, ["s1", "s2", "s3"], format=format)
    plan = ShardPlan(0, "train", ("s1", "s2", "s3"))
    old, _ = write_shard(tmp_path, column, plan, seed=1, ids=["s1"])
    with pytest.raises(DatasetError, match="shard exists"):
        ShardWriter(tmp_path / "col", plan, format, FIELDS).__enter__()
    with pytest.raises(RuntimeError):  # a failed rewrite leaves the old shard complete
        with ShardWriter(tmp_path / "col", plan, format, FIELDS, overwrite=True) as writer:
            writer.add("s2", sample_fields(np.random.default_rng(0), "s2"))
            raise RuntimeError("worker failed")
    assert shard_status(tmp_path / "col", 0, format) == old
    new, samples = write_shard(tmp_path, column, plan, seed=2, overwrite=True, ids=["s2", "s3"])
    assert new.sha256 != old.sha256 and shard_status(tmp_path / "col", 0, format) == new
    read = dict(read_shard(tmp_path, column, 0))
    assert list(read) == ["s2", "s3"]  # s1's row of the earlier write is gone, also in Zarr
    assert_same_sample(read["s3"], samples["s3"])


def test_abandoned_writers_leave_only_temporaries(tmp_path):
    for format in FORMATS:
        _, column = make_store(tmp_path / format, ["s1", "s2"], format=format)
        plan = ShardPlan(0, "train", ("s1", "s2"))
        writer = ShardWriter(tmp_path / format / "col", plan, format, FIELDS).__enter__()  # dies before __exit__
        writer.add("s1", sample_fields(np.random.default_rng(0), "s1"))
        assert shard_files(tmp_path / format / "col", 0, format) == []
        assert shard_status(tmp_path / format / "col", 0, format) is None
        with pytest.raises(LockedError, match="another writer is writing this shard"):  # it still lives
            write_shard(tmp_path / format, column, plan)
        writer._claim_held.close()  # its process dies: the kernel releases its claim (a flock), nothing else
        record, _ = write_shard(tmp_path / format, column, plan)  # a rerun is not blocked by the leftover
        assert shard_status(tmp_path / format / "col", 0, format) == record
        assert remove_temporaries(tmp_path / format / "col") == (format == "webdataset")
        assert shard_status(tmp_path / format / "col", 0, format) == record


def test_killed_worker_process_leaves_no_visible_shard(tmp_path):
    _, column = make_store(tmp_path, [f"s{i}" for i in range(50)], shard_size=50, format="webdataset",
                           fields={"blob": FieldSpec("array")})
    script = f"""
import os, signal
import numpy as np
from dualpm.store import FieldSpec, ShardPlan, ShardWriter
plan = ShardPlan(0, "train", tuple(f"s{{i}}" for i in range(50)))
with ShardWriter({str(tmp_path / "col")!r}, plan, "webdataset", {{"blob": FieldSpec("array")}}) as writer:
    for i in range(50):
        writer.add(f"s{{i}}", {{"blob": np.frombuffer(os.urandom(10000), np.uint8)}})
    os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    leftovers = sorted((tmp_path / "col").iterdir())
    assert len(leftovers) == 2 and leftovers[1].name.startswith(".tmp-shard-000000.tar")
    assert leftovers[0].name == ".claim-shard-000000"  # no longer held: its holder died
    assert leftovers[0].stat().st_size > 0  # it was killed mid-shard, with data written
    assert shard_status(tmp_path / "col", 0, "webdataset") is None


@pytest.mark.parametrize("format", FORMATS)
def test_status_detects_missing_and_changed_data(tmp_path, format):
    _, column = make_store(tmp_path, ["s1", "s2"], format=format)
    record, _ = write_shard(tmp_path, column, ShardPlan(0, "train", ("s1", "s2")))
    folder = tmp_path / "col"
    target = largest_data_file(folder, 0, format)
    original = target.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    target.write_bytes(bytes(flipped))
    assert shard_status(folder, 0, format) is None
    assert "sha256" in check_shard(folder, 0, format)[1]
    assert shard_status(folder, 0, format, check_checksum=False) == record  # same size: only sha256 sees it

    target.write_bytes(original[:-100])
    assert shard_status(folder, 0, format, check_checksum=False) is None
    assert "truncated" in check_shard(folder, 0, format)[1]

    target.write_bytes(original)
    assert shard_status(folder, 0, format) == record
    remove_shard(folder, 0, format)
    assert shard_files(folder, 0, format) == [] and not record_path(folder, 0).exists()
    assert shard_status(folder, 0, format) is None


def test_status_without_data_or_with_broken_record(tmp_path):
    _, column = make_store(tmp_path, ["s1", "s2", "s3"], shard_size=1, format="webdataset")
    manifest_plan = plan_shards({"train": ["s1", "s2", "s3"]}, 1)
    write_shard(tmp_path, column, manifest_plan[0])
    data_path(tmp_path / "col", 0).unlink()
    assert "data missing" in check_shard(tmp_path / "col", 0, "webdataset")[1]
    write_shard(tmp_path, column, manifest_plan[1])
    assert "format 'webdataset'" in check_shard(tmp_path / "col", 1, "zarr")[1]
    record_path(tmp_path / "col", 1).write_text("{")
    assert shard_status(tmp_path / "col", 1, "webdataset") is None
    assert "record missing" in check_shard(tmp_path / "col", 2, "webdataset")[1]


# --- integrity while reading -------------------------------------------------------------------------


@pytest.mark.parametrize("format", FORMATS)
def test_reading_a_damaged_shard_yields_nothing_and_names_shard_and_sample(tmp_path, format):
    ids = ["s1", "s2", "s3"]
    _, column = make_store(tmp_path, ids, format=format)
    write_shard(tmp_path, column, ShardPlan(0, "train", tuple(ids)))
    folder = tmp_path / "col"
    # Damage the dual point map of s2 only (inside its compressed bytes).
    if format == "zarr":
        target = next(p for name, p in shard_files(folder, 0, format) if name.startswith("dpm/values"))
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x40  # the middle of three samples' chunks: s2's
    else:
        target = data_path(folder, 0)
        data = bytearray(target.read_bytes())
        with tarfile.open(target) as tar:
            member = tar.getmember("s2.dpm.npz")
        data[member.offset_data + member.size // 2] ^= 0x40
    target.write_bytes(bytes(data))
    # Zarr: the three samples share one chunk of values (small rows), and none of them decodes.
    first = "s2" if format == "webdataset" else "s1"
    stream = read_shard(tmp_path, column, 0)
    with pytest.raises(DatasetError) as info:
        next(stream)  # the first sample (intact) is not yielded either: the shard is checked first
    message = str(info.value)
    assert f"{folder} shard 0: data do not match the sha256 of its record" in message
    assert f"first damaged sample: {folder} shard 0 sample {first!r}: field 'dpm' does not decode" in message
    # Without the shard check (`show`), each field still checks itself (zip / Zarr chunk checksums).
    decoded = []
    with pytest.raises(DatasetError, match=rf"{folder} shard 0 sample {first!r}: field 'dpm' does not decode"):
        for sample_id, fields in read_shard(tmp_path, column, 0, verify=False):
            fields["meta"], fields["dpm"]
            decoded.append(sample_id)
    assert decoded == (["s1"] if format == "webdataset" else [])


def test_reading_needs_a_record(tmp_path):
    _, column = make_store(tmp_path, ["s1"], format="webdataset")
    write_shard(tmp_path, column, ShardPlan(0, "train", ("s1",)))
    column.shards.clear()
    with pytest.raises(DatasetError, match="no record in manifest.json"):
        list(read_shard(tmp_path, column, 0))


# --- unsafe or malformed tars ------------------------------------------------------------------------


def craft_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))


def read_crafted(tmp_path: Path, members, fields=None) -> list:
    craft_tar(data_path(tmp_path / "col", 0), members)
    column = ColumnInfo("col", "webdataset", SCHEMA_VERSION, {}, dict(fields or {"meta": FieldSpec("json")}))
    return [(i, {k: f[k] for k in f}) for i, f in read_shard(tmp_path, column, 0, verify=False)]


def symlink_member() -> tarfile.TarInfo:
    info = tarfile.TarInfo("s2.meta.json")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


@pytest.mark.parametrize(
    "member",
    ["../evil.meta.json", "/abs.meta.json", "a/b.meta.json", "s1/../x.meta.json", "noext", "s2.meta",
     "s2.meta.exe", "s2..meta.json", "a%41.meta.json", "-bad.meta.json", "s2.me.ta.json"] + [symlink_member()],
)
def test_unsafe_tar_members_are_refused(tmp_path, member):
    name = member.name if isinstance(member, tarfile.TarInfo) else member
    with pytest.raises(DatasetError, match="tar member") as info:
        read_crafted(tmp_path, [("s1.meta.json", b"{}"), member if isinstance(member, tarfile.TarInfo)
                                else (member, b"{}")])
    assert str(data_path(tmp_path / "col", 0)) in str(info.value) and repr(name) in str(info.value)


def test_tar_samples_must_be_adjacent_and_fields_unique(tmp_path):
    with pytest.raises(DatasetError, match="not adjacent"):
        read_crafted(tmp_path, [("s1.meta.json", b"{}"), ("s2.meta.json", b"{}"), ("s1.x.npy", b"")])
    with pytest.raises(DatasetError, match="appears twice"):
        read_crafted(tmp_path, [("s1.meta.json", b"{}"), ("s1.meta.json", b"{}")])
    with pytest.raises(DatasetError, match="field 'meta' does not decode"):
        read_crafted(tmp_path, [("s1.meta.json", b"[1]")])
    with pytest.raises(DatasetError, match="a json field is stored as .json"):
        read_crafted(tmp_path, [("s1.meta.npy", b"")])
    assert read_crafted(tmp_path, [("a%2Eb.meta.json", b'{"k": 1}')]) == [("a.b", {"meta": {"k": 1}})]


def test_pickled_npy_is_refused(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match="field 'x' does not decode"):
        read_crafted(tmp_path, [("s1.x.npy", buffer.getvalue())], {"x": FieldSpec("array")})


def test_writer_refuses_bad_input(tmp_path):
    fields = {"x": FieldSpec("array", (2, 3), "float16"), "meta": FieldSpec("json", required=False)}
    _, column = make_store(tmp_path, ["s1", "s2", "a.b"], format="zarr", fields=fields)
    with ShardWriter(tmp_path / "col", ShardPlan(0, "train", ("s1", "s2", "a.b")), "zarr", fields) as writer:
        with pytest.raises(DatasetError, match="not valid"):
            writer.fail("a/b", "no")
        with pytest.raises(DatasetError, match="not in this shard's plan"):
            writer.add("zz", {"x": np.zeros((2, 3), np.float16), "meta": {}})
        with pytest.raises(TypeError, match="must be a dict"):
            writer.add("s1", {"x": np.zeros((2, 3), np.float16), "meta": b"{}"})
        with pytest.raises(DatasetError, match="unknown \\['y'\\]"):
            writer.add("s1", {"x": np.zeros((2, 3), np.float16), "meta": {}, "y": b""})
        with pytest.raises(DatasetError, match="missing \\['meta'\\]"):  # a Zarr row has every array
            writer.add("s1", {"x": np.zeros((2, 3), np.float16)})
        with pytest.raises(DatasetError, match="not JSON-serialisable"):
            writer.add("s1", {"x": np.zeros((2, 3), np.float16), "meta": {"x": float("nan")}})
        with pytest.raises(DatasetError, match=r"shape \(2, 4\), the column holds \(2, 3\)"):
            writer.add("s1", {"x": np.zeros((2, 4), np.float16), "meta": {}})
        with pytest.raises(DatasetError, match="dtype float32, the column holds float16"):
            writer.add("s1", {"x": np.zeros((2, 3), np.float32), "meta": {}})
        writer.add("s1", {"x": np.ones((2, 3), np.float16), "meta": {}})
        with pytest.raises(DatasetError, match="added twice"):
            writer.fail("s1", "again")
    column.shards[0] = writer.record
    assert [i for i, _ in read_shard(tmp_path, column, 0)] == ["s1"]  # refused samples left no trace


# --- verify_store ------------------------------------------------------------------------------------


def build_store(out: Path) -> Manifest:
    """Store with 3 planned shards over 2 splits; columns render (tar) and features (zarr)."""
    manifest = Manifest.create("synthetic", 2, plan_shards({"train": ["t1", "t2", "t3"], "val": ["v1"]}, 2))
    feature_fields = {"features": FieldSpec("array", (8, 4, 4), "float16")}
    for name, format, config, fields in [
        ("render", "webdataset", {"layers": L}, FIELDS),
        ("features", "zarr", {"channels": 8}, feature_fields),
    ]:
        manifest.columns[name] = ColumnInfo(name, format, SCHEMA_VERSION, config, dict(fields))
    out.mkdir(parents=True, exist_ok=True)
    publish_layout(out, manifest)
    rng = np.random.default_rng(0)
    for plan in manifest.plan:
        failed = ("t2",) if "t2" in plan.ids else ()
        write_shard(out, manifest.columns["render"], plan, failed, seed=plan.index)
        with ShardWriter(out / "features", plan, "zarr", feature_fields) as writer:
            for sample_id in plan.ids:
                if sample_id not in failed:
                    writer.add(sample_id, {"features": rng.standard_normal((8, 4, 4)).astype(np.float16)})
        manifest.columns["features"].shards[plan.index] = writer.record
    save_manifest(out, manifest)
    return manifest


def problems_of(out: Path, **options) -> list[tuple]:
    found = [(p.column, p.shard, p.sample, p.message) for p in verify_store(out, **options)]
    return sorted(found, key=lambda t: (t[0] or "", -1 if t[1] is None else t[1], t[2] or "", t[3]))


def test_verify_accepts_a_sound_store(tmp_path):
    build_store(tmp_path)
    assert verify_store(tmp_path) == []
    assert verify_store(tmp_path, columns=["features"], deep=False) == []


def test_verify_reports_exactly_the_damage(tmp_path):
    build_store(tmp_path)
    tar = data_path(tmp_path / "render", 0)
    tar.write_bytes(tar.read_bytes()[:-1024])  # truncated
    chunk = largest_data_file(tmp_path / "features", 1, "zarr")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte in t3's features
    chunk.write_bytes(bytes(data))
    record_path(tmp_path / "render", 2).unlink()  # a shard whose worker never finished
    found = problems_of(tmp_path)
    assert [(c, s, i) for c, s, i, _ in found] == [("features", 1, None), ("features", 1, "t3"),
                                                   ("render", 0, None), ("render", 2, None)]
    assert "sha256" in found[0][3] and "truncated" in found[2][3] and "record missing" in found[3][3]
    # The damaged sample is named: its chunk's crc32c fails (the tar lost only its end-of-archive blocks).
    assert found[1][3].startswith("field 'features' does not decode (Stored and computed checksum do not match")
    assert [(c, s) for c, s, _, _ in problems_of(tmp_path, deep=False)] == [("render", 0), ("render", 2)]


def test_verify_reports_schema_and_alignment_problems(tmp_path):
    manifest = build_store(tmp_path)
    render = manifest.columns["render"]
    rng = np.random.default_rng(5)
    wrong = dict(FIELDS) | {"dpm": FieldSpec("dpm", (H, W + 1, L, 7), "float16"),
                            "meta": FieldSpec("json", required=False), "extra": FieldSpec("json")}
    fields = sample_fields(rng, "v1")
    fields["dpm"] = np.zeros((H, W + 1, L, 7), np.float32)
    del fields["meta"]
    fields["extra"] = {}
    with ShardWriter(tmp_path / "render", manifest.plan[2], "webdataset", wrong, overwrite=True) as writer:
        writer.add("v1", fields)
    render.shards[2] = writer.record
    junk = dict(FIELDS) | {"dpm": FieldSpec("array")}
    with ShardWriter(tmp_path / "render", manifest.plan[1], "webdataset", junk, overwrite=True) as writer:
        writer.add("t3", sample_fields(rng, "t3") | {"dpm": np.zeros(3, np.uint8)})  # stored as .npy
    render.shards[1] = writer.record
    save_manifest(tmp_path, manifest)
    (tmp_path / "records" / "features" / "shard-000000.json").write_text(
        json.dumps(manifest.columns["features"].shards[0].to_json() | {"failures": [{"id": "t2", "reason": "x"}]}))
    assert problems_of(tmp_path) == [
        ("features", 0, None, "manifest.json's record differs from the shard's sidecar"),
        ("render", 1, None, f"{data_path(tmp_path / 'render', 1)}: tar member 't3.dpm.npy': a dpm field is "
                            "stored as .npz"),
        ("render", 2, "v1", f"field 'dpm' has shape {(H, W + 1, L, 7)}, the column holds {(H, W, L, 7)}"),
        ("render", 2, "v1", "required field 'meta' missing"),
        ("render", 2, "v1", "unexpected field 'extra'"),
    ]


def test_verify_reports_a_missing_manifest_and_unknown_columns(tmp_path):
    assert [str(p) for p in verify_store(tmp_path)] == [f"store: {tmp_path / 'manifest.json'}: not found"]
    build_store(tmp_path)
    assert problems_of(tmp_path, columns=["depth"]) == [("depth", None, None, "column not in manifest.json")]
    (tmp_path / "records" / "render" / "shard-000007.json").write_text(json.dumps({}))
    expected = [("render", 7, None, "shard record beyond the plan")]
    assert problems_of(tmp_path, columns=["render"], deep=False) == expected


@pytest.mark.parametrize("overwrite", [False, True])
def test_zarr_valid_is_published_after_every_other_field_of_its_rows(tmp_path, monkeypatch, overwrite):
    # Issue 22, item 3: `valid` marked the rows of a shard killed mid-publish as present while their `meta`
    # (and other fields) were still empty: a plain-zarr reader following docs/format.md broke.
    import zarr

    import dualpm.store.shards as shards_module

    _, column = make_store(tmp_path, ["s1", "s2"])
    plan = ShardPlan(0, "train", ("s1", "s2"))
    if overwrite:  # an earlier complete write of the shard, rewritten with other samples (s1 failed)
        write_shard(tmp_path, column, plan)
    published = []
    real = shards_module.atomic_write_bytes

    def killed_after_two(path, data):
        if len(published) == 2:
            raise KeyboardInterrupt("killed")
        published.append(Path(path).relative_to(tmp_path / "col").parts[0])
        real(path, data)

    monkeypatch.setattr(shards_module, "atomic_write_bytes", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        with ShardWriter(tmp_path / "col", plan, "zarr", FIELDS, overwrite=overwrite) as writer:
            writer.fail("s1", "x")
            writer.add("s2", sample_fields(np.random.default_rng(5), "s2"))
    assert "valid" not in published
    group = zarr.open_group(tmp_path, mode="r")
    valid, meta = group["col/valid"][:2], group["col/meta"][:2]
    assert not valid.any(), (published, valid, meta)  # nothing half-written is marked present
    monkeypatch.setattr(shards_module, "atomic_write_bytes", real)
    with ShardWriter(tmp_path / "col", plan, "zarr", FIELDS, overwrite=True) as writer:
        writer.fail("s1", "x")
        writer.add("s2", sample_fields(np.random.default_rng(5), "s2"))
    assert group["col/valid"][:2].tolist() == [False, True] and group["col/meta"][1] != ""


@pytest.mark.parametrize("format", FORMATS)
def test_two_writers_of_one_shard_the_second_is_refused_naming_the_first_until_it_dies(tmp_path, format):
    # Issue 22, item 4: the check meant to stop two writers publishing one shard never fired. A writer in
    # another process holds shard 0 (a stray worker of a killed run): a second writer is refused at once,
    # naming it; once it is killed (-9) the shard is written normally and its claim is gone.
    _, column = make_store(tmp_path, ["s1", "s2"], format=format)
    script = f"""
import sys, time
from dualpm.store import FieldSpec, ShardPlan, ShardWriter
from test_store_shards import FIELDS
sys.argv = ["dualpm-prep", "render", "SRC", "OUT"]
with ShardWriter({str(tmp_path / "col")!r}, ShardPlan(0, "train", ("s1", "s2")), {format!r}, FIELDS):
    print("writing", flush=True)
    time.sleep(120)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "writing\n"
        plan = ShardPlan(0, "train", ("s1", "s2"))
        host = socket.gethostname()
        with pytest.raises(LockedError, match=rf"col shard 0: another writer is writing this shard: held by pid "
                           rf"{holder.pid} on host {re.escape(host)} since .*Z, command: dualpm-prep render SRC OUT"):
            write_shard(tmp_path, column, plan)
        with pytest.raises(LockedError):  # also with overwrite: the claim is not a question of existing data
            write_shard(tmp_path, column, plan, overwrite=True)
        assert shard_files(tmp_path / "col", 0, format) == [] and not record_path(tmp_path / "col", 0).exists()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "col" / ".claim-shard-000000").exists()  # left by the killed writer: not a lock now
    record, samples = write_shard(tmp_path, column, plan)
    assert shard_status(tmp_path / "col", 0, format) == record
    assert_same_sample(dict(read_shard(tmp_path, column, 0))["s2"], samples["s2"])
    assert not (tmp_path / "col" / ".claim-shard-000000").exists()


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_verify_reports_what_the_reader_refuses_and_metadata_that_contradicts_the_manifest(tmp_path):
    # Issue 22, item 5: NaN features (Zarr), out-of-range features (tar), a missing schema block, a root
    # format_version or a manifest shard_size contradicting the arrays all passed `verify`.
    from dualpm.store import load_manifest as load
    from test_reader import write_store

    root = write_store(tmp_path / "nan", nan_features=frozenset({"0001"}))
    assert problems_of(root) == [
        ("features", 0, "0001", "field 'features' holds values that are not finite (NaN or inf)")]
    root = write_store(tmp_path / "huge", formats=("webdataset", "webdataset"))
    manifest = load(root)
    column, plan = manifest.columns["features"], manifest.plan[0]
    with ShardWriter(root / "features", plan, "webdataset", column.fields, overwrite=True) as writer:
        for sample_id in plan.ids:
            writer.add(sample_id, {"features": np.full((5, 8, 8), 2048 if sample_id == "0002" else 0.5, np.float16)})
    column.shards[0] = writer.record
    save_manifest(root, manifest)
    assert problems_of(root) == [
        ("features", 0, "0002", "field 'features' holds values up to 2048, beyond +-1000 (damaged)")]

    root = write_store(tmp_path / "schema")
    assert problems_of(root) == []
    _edit_json(root / "manifest.json", lambda m: m.pop("schema"))
    assert problems_of(root) == [(None, None, None, f"{root / 'manifest.json'}: no schema block ('schema')")]
    root = write_store(tmp_path / "version")
    _edit_json(root / "zarr.json", lambda z: z["attributes"]["dualpm"].update(format_version=3))
    assert {p[3] for p in problems_of(root)} == {
        f"{root / 'zarr.json'} ({view}): the schema block contradicts manifest.json in format_version"
        for view in ("consolidated metadata", "metadata")}
    root = write_store(tmp_path / "size")  # 8 + 4 samples in shards of 4: rows 12, arrays sharded by 4
    _edit_json(root / "manifest.json", lambda m: m.update(shard_size=8))
    found = {p[3] for p in problems_of(root)}
    assert f"{root / 'manifest.json'}: the schema block contradicts the manifest in rows, shard_size" in found
    assert f"{root / 'zarr.json'} (metadata): array 'ids': shape (12,), the plan gives (24,)" in found
    assert f"{root / 'zarr.json'} (metadata): array features/features: shape (12, 5, 8, 8), the plan gives " \
           "(24, 5, 8, 8)" in found


def test_an_edited_zarr_row_count_is_one_line_naming_the_array_not_an_index_error(tmp_path):
    # Issue 22, item 6: `render/dpm/values` with its row count edited made verify and training die with
    # IndexError in store/shards.py.
    from dualpm.data.reader import open_dataset
    from test_reader import write_store

    root = write_store(tmp_path / "data", formats=("zarr", "zarr"))

    def fewer_rows(meta: dict) -> None:
        meta["shape"][0] = 5

    _edit_json(root / "render" / "dpm" / "values" / "zarr.json", fewer_rows)
    _edit_json(root / "zarr.json", lambda z: fewer_rows(z["consolidated_metadata"]["metadata"]["render/dpm/values"]))
    message = f"{root / 'render' / 'dpm' / 'values'}: shape (5, 1536, 6), the plan gives (12, 1536, 6)"
    with pytest.raises(DatasetError, match=re.escape(message)):
        open_dataset(root)
    found = problems_of(root)
    assert ("render", None, None, f"{root / 'zarr.json'} (metadata): array render/dpm/values: shape (5, 1536, 6), "
            "the plan gives (12, 1536, 6)") in found
    assert ("render", 0, None, f"{message} (its Zarr metadata was changed; `dualpm-prep verify` lists every "
            "problem)") in found
