"""Column shards (WebDataset tar, Zarr v3): round trips, atomicity, resume checks, unsafe tars, verify."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dualpm.errors import DatasetError
from dualpm.fileio import remove_stale_temporaries
from dualpm.store.encoding import decode_dual_pointmap, decode_png, encode_dual_pointmap, png_bytes
from dualpm.store.manifest import (
    SCHEMA_VERSION,
    ColumnInfo,
    FieldSpec,
    Manifest,
    plan_shards,
    record_path,
    save_manifest,
)
from dualpm.store.shards import (
    ZARR_READ_ROWS,
    ShardWriter,
    check_shard,
    data_path,
    read_shard,
    remove_shard,
    shard_status,
)
from dualpm.store.verify import verify_store

H, W, L = 16, 12, 4
FORMATS = ["webdataset", "zarr"]
REPO = Path(__file__).parents[1]


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
    mask = random_dual_pointmap(rng)[..., 0, 6] > 0
    return {
        "dpm": encode_dual_pointmap(random_dual_pointmap(rng)),
        "mask.png": png_bytes(mask),
        "rgb.png": png_bytes(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)),
        "meta.json": {
            "model_name": "horse", "focal_length": 50.0, "source_id": sample_id, "camera": np.eye(4).tolist()
        },
        "feat.npy": rng.standard_normal((3, 4, 4)).astype(np.float16),
    }


def write_shard(folder: Path, index: int, format: str, ids, failed=(), seed=0, overwrite=False):
    rng = np.random.default_rng(seed)
    samples = {i: sample_fields(rng, i) for i in ids}
    with ShardWriter(folder, index, format, overwrite=overwrite) as writer:
        for sample_id, fields in samples.items():
            writer.add(sample_id, fields)
        for sample_id in failed:
            writer.fail(sample_id, f"{sample_id} has no mesh")
    return writer.record, samples


def largest_chunk_file(shard: Path) -> Path:
    """The biggest Zarr chunk (or shard) file of a shard folder: the place to damage."""
    chunks = (p for p in shard.rglob("*") if p.is_file() and "c" in p.relative_to(shard).parts)
    return max(chunks, key=lambda p: p.stat().st_size)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".tmp-"))


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip(tmp_path, format):
    ids = ["000001", "000007", "a_b-3"]
    record, samples = write_shard(tmp_path, 5, format, ids, failed=["000004"])
    assert record.ids == tuple(ids) and record.count == 3 and record.index == 5
    assert [(f.sample_id, f.reason) for f in record.failures] == [("000004", "000004 has no mesh")]
    assert shard_status(tmp_path, 5, format) == record
    read = list(read_shard(tmp_path, 5, format))
    assert [sample_id for sample_id, _ in read] == ids
    for sample_id, fields in read:
        expected = samples[sample_id]
        assert fields.keys() == expected.keys()
        assert fields["dpm"] == expected["dpm"] and fields["rgb.png"] == expected["rgb.png"]
        assert fields["meta.json"] == expected["meta.json"]
        assert fields["feat.npy"].dtype == np.float16
        np.testing.assert_array_equal(fields["feat.npy"], expected["feat.npy"])
        np.testing.assert_array_equal(decode_png(fields["mask.png"]), decode_png(expected["mask.png"]))
        assert decode_dual_pointmap(fields["dpm"]).shape == (H, W, L, 7)


def test_zarr_reads_across_row_blocks(tmp_path):
    # Arrays are read ZARR_READ_ROWS samples per call: a shard spanning several blocks (with a partial last
    # one) must come back exactly, and each sample's array must own its data (not pin a whole block).
    ids = [f"s{i:03d}" for i in range(2 * ZARR_READ_ROWS + 5)]
    _, samples = write_shard(tmp_path, 0, "zarr", ids)
    read = list(read_shard(tmp_path, 0, "zarr"))
    assert [sample_id for sample_id, _ in read] == ids
    for sample_id, fields in read:
        np.testing.assert_array_equal(fields["feat.npy"], samples[sample_id]["feat.npy"])
        assert fields["feat.npy"].base is None


@pytest.mark.parametrize("format", FORMATS)
def test_same_samples_give_the_same_checksum(tmp_path, format):
    first, _ = write_shard(tmp_path / "a", 0, format, ["x1", "x2"])
    second, _ = write_shard(tmp_path / "b", 0, format, ["x1", "x2"])
    assert first.sha256 == second.sha256 and first.bytes == second.bytes


@pytest.mark.parametrize("format", FORMATS)
def test_empty_shard_of_failures_only(tmp_path, format):
    record, _ = write_shard(tmp_path, 0, format, [], failed=["s1", "s2"])
    assert record.count == 0 and [f.sample_id for f in record.failures] == ["s1", "s2"]
    assert shard_status(tmp_path, 0, format) == record
    assert list(read_shard(tmp_path, 0, format)) == []


@pytest.mark.parametrize("format", FORMATS)
def test_exception_inside_the_writer_publishes_nothing(tmp_path, format):
    with pytest.raises(RuntimeError, match="render crashed"):
        with ShardWriter(tmp_path, 0, format) as writer:
            writer.add("s1", sample_fields(np.random.default_rng(0), "s1"))
            raise RuntimeError("render crashed")
    assert list(tmp_path.iterdir()) == []  # no data, no record, no temporaries
    assert shard_status(tmp_path, 0, format) is None


@pytest.mark.parametrize("format", FORMATS)
def test_overwrite_rules(tmp_path, format):
    old, _ = write_shard(tmp_path, 0, format, ["s1"], seed=1)
    with pytest.raises(DatasetError, match="shard exists"):
        ShardWriter(tmp_path, 0, format).__enter__()
    with pytest.raises(RuntimeError):  # a failed rewrite leaves the old shard complete
        with ShardWriter(tmp_path, 0, format, overwrite=True) as writer:
            writer.add("s2", sample_fields(np.random.default_rng(0), "s2"))
            raise RuntimeError("worker failed")
    assert shard_status(tmp_path, 0, format) == old
    new, _ = write_shard(tmp_path, 0, format, ["s2", "s3"], seed=2, overwrite=True)
    assert new.sha256 != old.sha256 and shard_status(tmp_path, 0, format) == new
    assert [i for i, _ in read_shard(tmp_path, 0, format)] == ["s2", "s3"]
    expected = [data_path(tmp_path, 0, format).name, "shard-000000.json"] + ["zarr.json"] * (format == "zarr")
    assert visible(tmp_path) == sorted(expected)


@pytest.mark.parametrize("format", FORMATS)
def test_abandoned_writer_leaves_only_a_temporary(tmp_path, format):
    writer = ShardWriter(tmp_path, 0, format).__enter__()  # a worker that dies before __exit__
    writer.add("s1", sample_fields(np.random.default_rng(0), "s1"))
    assert visible(tmp_path) == [] and len(list(tmp_path.iterdir())) == 1
    assert shard_status(tmp_path, 0, format) is None
    with pytest.raises(DatasetError, match="unreadable"):
        list(read_shard(tmp_path, 0, format))
    record, _ = write_shard(tmp_path, 0, format, ["s2"])  # a rerun is not blocked by the leftover
    assert shard_status(tmp_path, 0, format) == record
    assert remove_stale_temporaries(tmp_path) == 1 and shard_status(tmp_path, 0, format) == record


def test_killed_worker_process_leaves_no_visible_shard(tmp_path):
    script = f"""
import os, signal
from dualpm.store.shards import ShardWriter
with ShardWriter({str(tmp_path)!r}, 0, "webdataset") as writer:
    for i in range(50):
        writer.add(f"s{{i}}", {{"dpm": os.urandom(10000)}})
    os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-shard-000000.tar")
    assert leftovers[0].stat().st_size > 0  # it was killed mid-shard, with data written
    assert shard_status(tmp_path, 0, "webdataset") is None


@pytest.mark.parametrize("format", FORMATS)
def test_status_detects_missing_and_changed_data(tmp_path, format):
    record, _ = write_shard(tmp_path, 0, format, ["s1", "s2"])
    path = data_path(tmp_path, 0, format)
    target = path if format == "webdataset" else largest_chunk_file(path)
    original = target.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    target.write_bytes(bytes(flipped))
    assert shard_status(tmp_path, 0, format) is None
    assert "sha256" in check_shard(tmp_path, 0, format)[1]
    assert shard_status(tmp_path, 0, format, check_checksum=False) == record  # same size: only sha256 sees it

    target.write_bytes(original[:-100])
    assert shard_status(tmp_path, 0, format, check_checksum=False) is None
    assert "truncated" in check_shard(tmp_path, 0, format)[1]

    target.write_bytes(original)
    assert shard_status(tmp_path, 0, format) == record
    remove_shard(tmp_path, 0, format)
    assert visible(tmp_path) == (["zarr.json"] if format == "zarr" else [])
    assert shard_status(tmp_path, 0, format) is None


def test_status_without_data_or_with_broken_record(tmp_path):
    write_shard(tmp_path, 0, "webdataset", ["s1"])
    data_path(tmp_path, 0, "webdataset").unlink()
    assert "data missing" in check_shard(tmp_path, 0, "webdataset")[1]
    write_shard(tmp_path, 1, "webdataset", ["s1"])
    assert "format 'webdataset'" in check_shard(tmp_path, 1, "zarr")[1]
    record_path(tmp_path, 1).write_text("{")
    assert shard_status(tmp_path, 1, "webdataset") is None
    assert "record missing" in check_shard(tmp_path, 2, "webdataset")[1]


def craft_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))


def symlink_member() -> tarfile.TarInfo:
    info = tarfile.TarInfo("s2.dpm")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


@pytest.mark.parametrize(
    "member",
    ["../evil.dpm", "/abs.dpm", "a/b.dpm", "s1/../x.dpm", "noext", "-bad.dpm", "s2.", "s2..dpm"]
    + [symlink_member()],
)
def test_unsafe_tar_members_are_refused(tmp_path, member):
    path = data_path(tmp_path, 0, "webdataset")
    craft_tar(path, [("s1.dpm", b"ok"), member if isinstance(member, tarfile.TarInfo) else (member, b"x")])
    name = member.name if isinstance(member, tarfile.TarInfo) else member
    with pytest.raises(DatasetError, match="tar member") as info:
        list(read_shard(tmp_path, 0, "webdataset"))
    assert str(path) in str(info.value) and repr(name) in str(info.value)


def test_tar_samples_must_be_adjacent_and_fields_unique(tmp_path):
    path = data_path(tmp_path, 0, "webdataset")
    craft_tar(path, [("s1.dpm", b"a"), ("s2.dpm", b"b"), ("s1.meta.json", b"{}")])
    with pytest.raises(DatasetError, match="not adjacent"):
        list(read_shard(tmp_path, 0, "webdataset"))
    craft_tar(path, [("s1.dpm", b"a"), ("s1.dpm", b"b")])
    with pytest.raises(DatasetError, match="appears twice"):
        list(read_shard(tmp_path, 0, "webdataset"))
    craft_tar(path, [("s1.meta.json", b"[1]")])
    with pytest.raises(DatasetError, match="'meta.json' does not decode"):
        list(read_shard(tmp_path, 0, "webdataset"))


def test_pickled_npy_is_refused(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    craft_tar(data_path(tmp_path, 0, "webdataset"), [("s1.x.npy", buffer.getvalue())])
    with pytest.raises(DatasetError, match="'x.npy' does not decode"):
        list(read_shard(tmp_path, 0, "webdataset"))


def test_writer_refuses_bad_input(tmp_path):
    with ShardWriter(tmp_path, 0, "zarr") as writer:
        with pytest.raises(DatasetError, match="not valid"):
            writer.add("a.b", {"dpm": b""})
        with pytest.raises(TypeError, match="must be a dict"):
            writer.add("s1", {"meta.json": b"{}"})
        with pytest.raises(TypeError, match="must be bytes"):
            writer.add("s1", {"meta": {"a": 1}})
        with pytest.raises(ValueError, match="field name"):
            writer.add("s1", {"a/b": b""})
        with pytest.raises(DatasetError, match="not JSON-serialisable"):
            writer.add("s1", {"meta.json": {"x": float("nan")}})
        writer.add("s1", {"x.npy": np.zeros((2, 3), np.float16), "meta.json": {}})
        with pytest.raises(DatasetError, match=r"float16\[2, 4\], other samples .* float16\[2, 3\]"):
            writer.add("s2", {"x.npy": np.zeros((2, 4), np.float16), "meta.json": {}})
        with pytest.raises(DatasetError, match="differ from this shard's"):
            writer.add("s2", {"x.npy": np.zeros((2, 3), np.float16)})
        with pytest.raises(DatasetError, match="added twice"):
            writer.fail("s1", "again")
    assert [i for i, _ in read_shard(tmp_path, 0, "zarr")] == ["s1"]  # refused samples left no trace


# --- verify_store ------------------------------------------------------------------------------------


def build_store(out: Path) -> Manifest:
    """Store with 3 planned shards over 2 splits; columns render (tar) and features (zarr)."""
    manifest = Manifest.create("synthetic", 2, plan_shards({"train": ["t1", "t2", "t3"], "val": ["v1"]}, 2))
    render_fields = {"dpm": FieldSpec(shape=(H, W, L, 7)), "mask.png": FieldSpec(shape=(H, W)),
                     "rgb.png": FieldSpec(required=False), "meta.json": FieldSpec(), "feat.npy": FieldSpec()}
    feature_fields = {"features.npy": FieldSpec(shape=(8, 4, 4), dtype="float16")}
    for name, format, config, fields in [
        ("render", "webdataset", {"layers": L}, render_fields),
        ("features", "zarr", {"channels": 8}, feature_fields),
    ]:
        manifest.columns[name] = ColumnInfo(name, format, SCHEMA_VERSION, config, fields)
    rng = np.random.default_rng(0)
    for plan in manifest.plan:
        failed = ("t2",) if "t2" in plan.ids else ()
        kept = [i for i in plan.ids if i not in failed]
        record, _ = write_shard(out / "render", plan.index, "webdataset", kept, failed, seed=plan.index)
        manifest.columns["render"].shards[plan.index] = record
        with ShardWriter(out / "features", plan.index, "zarr") as writer:
            for sample_id in kept:
                writer.add(sample_id, {"features.npy": rng.standard_normal((8, 4, 4)).astype(np.float16)})
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
    tar = data_path(tmp_path / "render", 0, "webdataset")
    tar.write_bytes(tar.read_bytes()[:-1024])  # truncated
    chunk = largest_chunk_file(data_path(tmp_path / "features", 1, "zarr"))
    data = bytearray(chunk.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte
    chunk.write_bytes(bytes(data))
    record_path(tmp_path / "render", 2).unlink()  # a shard whose worker never finished
    found = problems_of(tmp_path)
    assert [(c, s) for c, s, _, _ in found] == [("features", 1), ("render", 0), ("render", 2)]
    assert "sha256" in found[0][3] and "truncated" in found[1][3] and "record missing" in found[2][3]
    assert [(c, s) for c, s, _, _ in problems_of(tmp_path, deep=False)] == [("render", 0), ("render", 2)]


def test_verify_reports_schema_and_alignment_problems(tmp_path):
    manifest = build_store(tmp_path)
    fields = sample_fields(np.random.default_rng(5), "v1")
    del fields["meta.json"]
    fields["dpm"] = encode_dual_pointmap(np.zeros((H, W + 1, L, 7), np.float32))
    fields["extra"] = b""
    with ShardWriter(tmp_path / "render", 2, "webdataset", overwrite=True) as writer:
        writer.add("v1", fields)
    manifest.columns["render"].shards[2] = writer.record
    with ShardWriter(tmp_path / "render", 1, "webdataset", overwrite=True) as writer:
        writer.add("t3", sample_fields(np.random.default_rng(6), "t3") | {"dpm": b"junk"})
    manifest.columns["render"].shards[1] = writer.record
    with ShardWriter(tmp_path / "features", 0, "zarr", overwrite=True) as writer:  # plan: t1, t2
        for sample_id in ("t2", "t1", "zz"):
            writer.add(sample_id, {"features.npy": np.zeros((8, 4, 4), np.float32)})
    save_manifest(tmp_path, manifest)  # the manifest keeps features shard 0's old record
    dtype = "field 'features.npy' has dtype float32, column expects float16"
    bad_magic = "not an encoded dual point map (bad magic or too short)"
    assert problems_of(tmp_path) == [
        ("features", 0, None, "manifest.json's record differs from the shard's sidecar"),
        ("features", 0, None, "samples are not in plan order"),
        ("features", 0, "t1", dtype),
        ("features", 0, "t2", dtype),
        ("features", 0, "zz", dtype),
        ("features", 0, "zz", "sample is not in this shard's plan"),
        ("render", 1, "t3", f"field 'dpm' does not decode ({bad_magic})"),
        ("render", 2, "v1", f"field 'dpm' has shape {(H, W + 1, L, 7)}, column expects {(H, W, L, 7)}"),
        ("render", 2, "v1", "required field 'meta.json' missing"),
        ("render", 2, "v1", "unexpected field 'extra'"),
    ]


def test_verify_reports_a_missing_manifest_and_unknown_columns(tmp_path):
    assert [str(p) for p in verify_store(tmp_path)] == [f"store: {tmp_path / 'manifest.json'}: not found"]
    build_store(tmp_path)
    assert problems_of(tmp_path, columns=["depth"]) == [("depth", None, None, "column not in manifest.json")]
    (tmp_path / "render" / "shard-000007.json").write_text(json.dumps({}))
    expected = [("render", 7, None, "shard record beyond the plan")]
    assert problems_of(tmp_path, columns=["render"], deep=False) == expected
