"""`dualpm-prep render`: round trips against direct rendering, resume, SIGKILL, failures, backend choice.

The CLI runs on the session's local Ray (tests/conftest.py) through click's CliRunner, except the
SIGKILL test, which runs the real command in its own process session and kills all of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from datagen import TUBE_LENGTH, make_source_dataset, sample_id
from dualpm.camera import (
    BLENDER_TO_Y_UP,
    format_camera_txt,
    projection_from_focal,
    read_camera_txt,
    view_from_camera_pose,
)
from dualpm.data.source import SourceDataset
from dualpm.errors import BackendUnavailable
from dualpm.gltf import load_skinned_mesh
from dualpm.masks import read_mask
from dualpm.render import render_dual_pointmaps
from dualpm.skinning import read_pose_file, skin
from dualpm.store import (
    FAILURES_NAME,
    SCHEMA_VERSION,
    ColumnInfo,
    ShardPlan,
    check_shard,
    decode_png,
    load_manifest,
    read_shard,
    shard_files,
    verify_store,
)
from pipeline import render_stage
from dualpm.store.encoding import SparseDualPointMap, read_dpm_npz, rgb8
from pipeline.cli import main
from pipeline.cluster import ClusterInfo
from pipeline.render_stage import (
    RenderConfig,
    _sample_fields,
    choose_backend,
    clip_planes,
    render_fields,
    task_resources,
)

REPO = Path(__file__).parents[1]
RES, LAYERS = 32, 4


def render_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["render", *args], catch_exceptions=False)
    return result.exit_code, result.output


def stored_samples(out: Path) -> dict[str, dict]:
    manifest = load_manifest(out)
    column = manifest.columns["render"]
    samples = {}
    for plan in manifest.plan:
        for sid, fields in read_shard(out, column, plan.index):
            assert sid not in samples
            samples[sid] = fields
    return samples


def direct_render(root: Path, sid: str, layers: int = LAYERS) -> np.ndarray:
    """(H, W, L, 7) of one sample rendered without the pipeline."""
    sample = SourceDataset(root).sample(sid)
    mesh = load_skinned_mesh(SourceDataset(root).layout.mesh(sample.model_name))
    posed = skin(mesh, read_pose_file(sample.pose_path, mesh.num_nodes))
    view = view_from_camera_pose(torch.tensor(sample.camera_pose)[None])
    projection = projection_from_focal(torch.tensor([sample.focal_length], dtype=torch.float64))
    canonical, faces = torch.tensor(mesh.vertices), torch.tensor(mesh.faces)
    out = render_dual_pointmaps(canonical, posed, faces, view, projection, RES, layers, backend="cpu", workers=1)
    return out[0].numpy()


@pytest.mark.parametrize("fmt, precision", [("webdataset", "float16"), ("zarr", "float16"), ("zarr", "float32")])
def test_round_trip_equals_direct_rendering_within_the_precision(tmp_path, ray_local, fmt, precision):
    ds = make_source_dataset(tmp_path / "src", num_samples=6, models=2, val=2, image_size=24)
    out = tmp_path / "out"
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", str(LAYERS),
                              "--shard-size", "3", "--format", fmt, "--batch", "2", "--store-dtype", precision)
    assert code == 0, output
    assert "render: 6 samples written, 0 failed" in output
    samples = stored_samples(out)
    assert sorted(samples) == ds.ids
    for sid, fields in samples.items():
        expected = direct_render(ds.root, sid)
        assert expected[..., 6].any()
        # float32: exactly the rendered map; float16: rounded to nearest
        np.testing.assert_array_equal(fields["dpm"], expected.astype(precision).astype(np.float32))
        source_rgb = (ds.root / "renders" / f"{sid}_rgb.png").read_bytes()
        np.testing.assert_array_equal(fields["rgb"], rgb8(source_rgb, "source"))  # (h, w, 3) uint8
        source_mask = read_mask(ds.root / "masks" / f"{sid}_mask.png") > 0.5
        np.testing.assert_array_equal(fields["mask"], source_mask)
        if fmt == "webdataset":
            assert fields.raw("rgb") == source_rgb  # the file, byte for byte
            assert decode_png(fields.raw("mask")).dtype == np.bool_  # 1-bit, whatever the source's encoding
            assert read_dpm_npz(fields.raw("dpm"))[1].dtype == precision
        else:
            assert fields.raw("mask").dtype == np.uint8 and fields.raw("dpm")[1].dtype == precision
        meta = fields["meta"]
        assert 0.5 < meta["mask_iou"] <= 1.0  # a 24 px source mask of a tiny tube, resampled to 32 px
        source = SourceDataset(ds.root).sample(sid)
        assert (meta["source_id"], meta["model_name"], meta["mask"]) == (sid, ds.model_of[sid], "source")
        assert meta["focal_length"] == source.focal_length
        np.testing.assert_array_equal(meta["camera_pose"], source.camera_pose)
        view = np.linalg.inv(BLENDER_TO_Y_UP @ source.camera_pose)
        np.testing.assert_allclose(meta["view"], view, atol=1e-12)
        np.testing.assert_allclose(meta["projection"], projection_from_focal(source.focal_length), rtol=1e-6)
    manifest = load_manifest(out)
    column = manifest.columns["render"]
    assert column.format == fmt and column.config["backend"] == "cpu"
    assert (column.config["resolution"], column.config["layers"]) == (RES, LAYERS)
    assert column.fields["dpm"].shape == (RES, RES, LAYERS, 7) and column.fields["dpm"].dtype == precision
    assert column.config["precision"] == precision and column.fields["mask"].shape == (
        None if fmt == "webdataset" else (24, 24))
    assert [p.split for p in manifest.plan] == ["train", "train", "val"]
    assert (out / "render.config.yaml").exists()
    assert verify_store(out) == []


def test_without_source_mask_the_rendered_coverage_is_stored(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=2, masks=False, rgb=False)
    code, output = render_cli(str(ds.root), str(tmp_path / "out"), "--resolution", str(RES), "--layers", "2")
    assert code == 0, output
    for sid, fields in stored_samples(tmp_path / "out").items():
        coverage = fields["dpm"][:, :, 0, 6] > 0
        np.testing.assert_array_equal(fields["mask"], coverage)
        assert "rgb" not in fields and fields["meta"]["mask"] == "rendered"


def test_published_0_1_masks_are_read_and_an_empty_mask_fails_its_sample(tmp_path, ray_local):
    # The published set stores masks as 0/1 8-bit PNGs; read as 0..255 they would look empty.
    ds = make_source_dataset(tmp_path / "src", num_samples=3, rgb=False, image_size=32)
    originals = {}
    for sid in ds.ids:
        path = ds.root / "masks" / f"{sid}_mask.png"
        originals[sid] = read_mask(path) > 0.5
        Image.fromarray(originals[sid].astype(np.uint8), mode="L").save(path)  # values 0 and 1
    empty = ds.ids[1]
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(ds.root / "masks" / f"{empty}_mask.png")
    code, output = render_cli(str(ds.root), str(tmp_path / "out"), "--resolution", str(RES), "--layers", "2")
    assert code == 0, output
    assert "render: 2 samples written, 1 failed" in output
    samples = stored_samples(tmp_path / "out")
    assert sorted(samples) == [ds.ids[0], ds.ids[2]]
    for sid, fields in samples.items():
        np.testing.assert_array_equal(fields["mask"], originals[sid])
        assert fields["meta"]["mask_iou"] > 0.9  # same resolution as the render: near-exact agreement
    failure = json.loads((tmp_path / "out" / FAILURES_NAME).read_text())
    assert failure["id"] == empty
    assert f"{empty}_mask.png: the mask is empty, but the render covers" in failure["reason"]


@pytest.mark.parametrize("fmt", ["zarr", "webdataset"])
def test_ids_with_dots_and_unicode_are_samples_and_only_unusable_ids_are_reported(tmp_path, ray_local, fmt):
    # Issue 18, item 2: such files used to vanish from the scan with "0 failed" and nothing listed.
    ds = make_source_dataset(tmp_path / "src", num_samples=3, image_size=RES)
    renamed = dict(zip(ds.ids, ["a.b", "ünïcode", "bad id$"], strict=True))
    for folder in ("poses", "cameras", "metadata", "renders", "masks"):
        for path in (ds.root / folder).iterdir():
            old, _, rest = path.name.partition("_")
            path.rename(path.with_name(f"{renamed[old]}_{rest}"))
    out = tmp_path / "out"
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2", "--format", fmt)
    assert code == 0 and "render: 2 samples written, 0 failed" in output, output
    assert "source: 5 files not taken (5 invalid-id)" in output
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert {(x["id"], x["kind"]) for x in skipped} == {("bad id$", "invalid-id")} and len(skipped) == 5
    stored = stored_samples(out)
    assert sorted(stored) == sorted(["a.b", "ünïcode"])
    for new_id, fields in stored.items():
        old = next(k for k, v in renamed.items() if v == new_id)
        np.testing.assert_array_equal(fields["dpm"], direct_render(ds.root, new_id, 2).astype(np.float16).astype(np.float32))
        assert fields["meta"]["source_id"] == new_id and ds.model_of[old] == fields["meta"]["model_name"]
    assert verify_store(out) == []


def test_files_no_sample_takes_are_counted_in_the_summary_and_listed(tmp_path, ray_local):
    # Files with odd ids used to vanish: "0 failed" and an empty failures.jsonl.
    ds = make_source_dataset(tmp_path / "src", num_samples=3, rgb=False, image_size=RES)
    (ds.root / "poses" / f"{ds.ids[0]}_pose.npz").rename(ds.root / "poses" / "bad id$_pose.npz")
    out = tmp_path / "out"
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2", "--dry-run")
    assert code == 0 and "source: 4 files not taken (1 invalid-id, 3 no-pose); listed on a real run" in output
    assert not out.exists()
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2")
    assert code == 0 and "render: 2 samples written, 0 failed" in output, output
    assert f"source: 4 files not taken (1 invalid-id, 3 no-pose); see {out / 'skipped.jsonl'}" in output
    lines = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(x["file"], x["id"], x["kind"]) for x in lines] == [
        ("poses/bad id$_pose.npz", "bad id$", "invalid-id"),
        (f"cameras/{ds.ids[0]}_camera.txt", ds.ids[0], "no-pose"),
        (f"metadata/{ds.ids[0]}_metadata.txt", ds.ids[0], "no-pose"),
        (f"masks/{ds.ids[0]}_mask.png", ds.ids[0], "no-pose"),
    ]
    assert "characters ' ', '$' are not allowed" in lines[0]["reason"]


def data_files(out: Path) -> dict[str, tuple[int, int]]:
    """Every file of the render column and its records (relative path -> mtime, inode)."""
    files = [p for folder in (out / "render", out / "records" / "render") for p in folder.rglob("*") if p.is_file()]
    return {p.relative_to(out).as_posix(): (p.stat().st_mtime_ns, p.stat().st_ino) for p in files}


@pytest.mark.parametrize("fmt", ["webdataset", "zarr"])
def test_resume_after_deleting_a_shard_renders_only_that_shard(tmp_path, ray_local, fmt):
    ds = make_source_dataset(tmp_path / "src", num_samples=8, models=2)
    out = tmp_path / "out"
    args = [str(ds.root), str(out), "--resolution", str(RES), "--layers", str(LAYERS), "--shard-size", "2",
            "--format", fmt]
    assert render_cli(*args)[0] == 0
    before = data_files(out)
    old_record = load_manifest(out).columns["render"].shards[2]
    for _, path in shard_files(out / "render", 2, fmt):
        path.unlink()
    code, output = render_cli(*args)
    assert code == 0, output
    assert "2 samples written" in output and "1 shards done, 3 already complete" in output
    after = data_files(out)
    changed = sorted(name for name in after if after[name] != before.get(name))
    shard_2 = ["render/shard-000002.tar"] if fmt == "webdataset" else [
        "render/dpm/counts/c/2/0/0", "render/dpm/values/c/2/0/0", "render/mask/c/2/0/0", "render/meta/c/2",
        "render/rgb/c/2/0/0/0", "render/valid/c/2"]
    assert changed == sorted(shard_2 + ["records/render/shard-000002.json"])
    assert load_manifest(out).columns["render"].shards[2] == old_record  # deterministic: same bytes again
    assert verify_store(out) == []


def test_bad_samples_end_in_failures_jsonl_and_the_others_are_written(tmp_path, ray_local):
    bad = {sample_id(1): "corrupt_pose", sample_id(2): "pose_node_count", sample_id(4): "camera_away",
           sample_id(5): "broken_mesh", sample_id(7): "bad_metadata"}
    ds = make_source_dataset(tmp_path / "src", num_samples=9, models=2, bad=bad)
    out = tmp_path / "out"
    args = [str(ds.root), str(out), "--resolution", str(RES), "--layers", "2"]
    code, output = render_cli(*args, "--shard-size", "4")
    assert code == 0, output
    assert "4 samples written, 5 failed (5 in the column)" in output
    lines = [json.loads(line) for line in (out / FAILURES_NAME).read_text().splitlines()]
    reasons = {line["id"]: line["reason"] for line in lines}
    assert sorted(reasons) == sorted(bad) and len(lines) == len(bad)
    phrases = {"corrupt_pose": "cannot read pose file", "pose_node_count": "has 5 nodes but the mesh has 4",
               "camera_away": "mesh outside the view", "broken_mesh": "model 'broken'",
               "bad_metadata": "metadata is missing focal_length"}
    for sid, kind in bad.items():
        assert phrases[kind] in reasons[sid], (kind, reasons[sid])
    assert sorted(stored_samples(out)) == ds.good_ids
    assert verify_store(out) == []
    # The failures exceed a limit of 4: the rerun (nothing left to render) fails, and says why.
    result = CliRunner().invoke(main, ["render", *args, "--max-failures", "4"])
    assert result.exit_code != 0 and "5 samples failed, more than --max-failures 4" in result.output
    assert len((out / FAILURES_NAME).read_text().splitlines()) == len(bad)  # not duplicated


def _make_singular_camera(root: Path, sid: str) -> Path:
    """Zero the camera's first rotation column: a matrix with no inverse, whatever else it holds."""
    path = SourceDataset(root).layout.camera(sid)
    pose = read_camera_txt(path)
    pose[:3, 0] = 0.0
    path.write_text(format_camera_txt(pose))
    return path


def test_a_singular_camera_fails_its_sample_and_the_shard_is_written(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=8, rgb=False, masks=False)
    camera = _make_singular_camera(ds.root, sample_id(1))
    out = tmp_path / "out"
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2",
                              "--shard-size", "8", "--batch", "4")
    assert code == 0, output
    assert "7 samples written, 1 failed" in output
    [line] = [json.loads(line) for line in (out / FAILURES_NAME).read_text().splitlines()]
    assert line["id"] == sample_id(1)
    assert line["reason"].startswith(f"{camera}: camera matrix is singular or nearly so"), line
    assert sorted(stored_samples(out)) == [i for i in ds.ids if i != sample_id(1)]


def _shard(ds, tmp_path, batch: int) -> tuple[RenderConfig, ShardPlan, Path]:
    folder = tmp_path / "render"
    folder.mkdir()
    return RenderConfig(str(ds.root), RES, 2, "cpu", batch, "webdataset"), ShardPlan(0, "train", tuple(ds.ids)), folder


@pytest.mark.parametrize("batch", [1, 3])
def test_an_unexpected_error_in_one_sample_fails_that_sample_only(tmp_path, monkeypatch, batch):
    ds = make_source_dataset(tmp_path / "src", num_samples=5, rgb=False, masks=False)
    source = SourceDataset(ds.root)
    culprit = read_pose_file(source.layout.pose(sample_id(2)), 4)

    def skin_failing_on_the_culprit(mesh, poses, device="cpu"):
        if any(np.array_equal(pose, culprit) for pose in np.asarray(poses).reshape(-1, 4, 7)):
            raise torch.linalg.LinAlgError("linalg.inv: (Batch element 1): The diagonal element 3 is zero")
        return skin(mesh, poses, device=device)

    monkeypatch.setattr(render_stage, "skin", skin_failing_on_the_culprit)
    config, plan, folder = _shard(ds, tmp_path, batch)
    record = render_stage.render_shard(config, plan, str(folder))
    assert record.ids == tuple(i for i in ds.ids if i != sample_id(2))
    [failure] = record.failures
    assert failure.sample_id == sample_id(2)
    assert failure.reason.startswith("unexpected _LinAlgError rendering this sample alone (linalg.inv: (Batch "
                                     "element 1): The diagonal element 3 is zero); pose ")
    assert str(source.layout.camera(sample_id(2))) in failure.reason and "please report it" in failure.reason
    column = ColumnInfo("render", "webdataset", SCHEMA_VERSION, {}, render_fields(config), {0: record})
    stored = dict(read_shard(tmp_path, column, 0))
    for sid in record.ids:  # the others as rendered on their own
        got = stored[sid]["dpm"]
        np.testing.assert_array_equal(got, direct_render(ds.root, sid, 2).astype(np.float16).astype(np.float32))


def test_a_shard_where_nothing_renders_fails_the_task_not_its_samples(tmp_path, monkeypatch):
    # A broken worker or a bug fails every sample alike: that is not the data's fault, and recording it
    # as sample failures would mark the shard done; the shard task fails and a rerun redoes it.
    ds = make_source_dataset(tmp_path / "src", num_samples=3, rgb=False, masks=False)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(render_stage, "render_dual_pointmaps", broken)
    config, plan, folder = _shard(ds, tmp_path, 2)
    with pytest.raises(RuntimeError, match=r"shard 0: no sample rendered; 3 failed unexpectedly, the first: "
                       r"000001: unexpected RuntimeError .*illegal memory access"):
        render_stage.render_shard(config, plan, str(folder))
    assert not list(folder.iterdir())  # nothing published


def test_backend_cuda_without_gpu_fails_fast_and_writes_nothing(tmp_path, ray_local):
    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray cluster has a GPU")
    ds = make_source_dataset(tmp_path / "src", num_samples=2, rgb=False, masks=False)
    out = tmp_path / "out"
    start = time.monotonic()
    result = CliRunner().invoke(main, ["render", str(ds.root), str(out), "--backend", "cuda"])
    assert result.exit_code == 1
    assert "--backend cuda: there is no GPU in the local Ray cluster" in result.output
    assert "use --backend cpu" in result.output
    assert time.monotonic() - start < 60  # generous: a GPU task here would wait forever instead
    assert not out.exists()


def test_dry_run_prints_config_and_plan_and_writes_nothing(tmp_path):
    ds = make_source_dataset(tmp_path / "src", num_samples=5, val=2, rgb=False, masks=False)
    code, output = render_cli(str(ds.root), str(tmp_path / "out"), "--dry-run", "--shard-size", "2")
    assert code == 0
    assert "resolution: 160" in output and "train 3 samples in 2 shards, val 2 samples in 1 shards" in output
    assert not (tmp_path / "out").exists()


def test_out_must_be_apart_from_src(tmp_path):
    ds = make_source_dataset(tmp_path / "data" / "src", num_samples=2, rgb=False, masks=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = {ds.root: f"{ds.root}: OUT is the source dataset SRC itself",
             ds.root / "prepared": f"{ds.root / 'prepared'}: OUT is inside the source dataset SRC ({ds.root})",
             tmp_path / "data": f"{ds.root}: the source dataset SRC is inside OUT ({tmp_path / 'data'})"}
    for out, message in cases.items():
        code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2")
        assert code == 1 and output.startswith(f"Error: {message}"), output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written


def test_choose_backend_and_resources():
    cpu_only = ClusterInfo(None, cpus=8, gpus=0, nodes=1)
    gpus = ClusterInfo("head:6379", cpus=32, gpus=4, nodes=2)
    assert choose_backend("auto", cpu_only) == "cpu" and choose_backend("auto", gpus) == "cuda"
    assert choose_backend("cpu", gpus) == "cpu" and choose_backend("cuda", gpus) == "cuda"
    with pytest.raises(BackendUnavailable, match="no GPU in the Ray cluster at head:6379"):
        choose_backend("cuda", ClusterInfo("head:6379", cpus=8, gpus=0, nodes=2))
    assert task_resources("cpu", gpus) == ({"num_cpus": 1}, 1)
    assert task_resources("cuda", gpus) == ({"num_gpus": 1, "num_cpus": 8}, 8)


@pytest.mark.parametrize("form", ["sparse", "dense"])  # the cpu backend's maps, cuda's
def test_non_finite_and_empty_maps_are_sample_failures(tmp_path, form):
    ds = make_source_dataset(tmp_path / "src", num_samples=1, rgb=False, masks=False)
    sample = SourceDataset(ds.root).sample(ds.ids[0])
    config = RenderConfig(str(ds.root), 4, 2, "cpu", 1, "webdataset")
    clip = clip_planes(4.0, 5.0, config.near, config.far)

    def rendered(hit: list[float] | None):  # one hit at pixel (1, 1), layer 0, or none
        counts = np.zeros((4, 4), np.uint8)
        values = np.zeros((0, 6), np.float32) if hit is None else np.array([hit], np.float32)
        counts[1, 1] = len(values)
        if form == "sparse":
            return SparseDualPointMap(counts, values, 2)
        dense = np.zeros((4, 4, 2, 7), np.float32)
        if hit is not None:
            dense[1, 1, 0] = [*hit, 1]
        return dense

    fields = lambda hit: _sample_fields(sample, rendered(hit), np.eye(4), np.eye(4), config, clip)  # noqa: E731
    assert "mesh outside the view" in fields(None)
    assert "non-finite" in fields([0, 0, 0, 0, 0, np.nan])
    assert "beyond +-65504" in fields([1e6, 0, 0, 0, 0, 0])  # beyond float16
    prepared = fields([1, 2, 3, 4, 5, 6])
    counts, values, layers = read_dpm_npz(prepared.values["dpm"])
    assert layers == 2 and counts[1, 1] == 1 and values.tolist() == [[1, 2, 3, 4, 5, 6]]
    meta = json.loads(prepared.values["meta"])  # stored as JSON text
    assert (meta["near"], meta["far"], meta["depth_range"], meta["clipped_by"]) == (0.1, 30.0, [4.0, 5.0], [])


def test_clip_planes_fixed_auto_and_which_plane_clipped_the_mesh():
    beyond = clip_planes(160.0, 300.0, 0.1, 30.0)  # a rig in cm, seen from 1.6 to 3 m
    assert (beyond.near, beyond.far, beyond.problem, beyond.clipped_by()) == (0.1, 30.0, None, ["far"])
    message = beyond.uncovered()
    assert "beyond the far plane (30)" in message and "[160, 300]" in message and "--far auto" in message
    nearer = clip_planes(0.01, 0.05, 0.1, 30.0).uncovered()
    assert "nearer than the near plane (0.1)" in nearer and "--near auto" in nearer
    assert "check the camera and pose files" in clip_planes(2.0, 3.0, 0.1, 30.0).uncovered()
    auto = clip_planes(160.0, 300.0, "auto", "auto")
    assert (auto.near, auto.far, auto.problem, auto.clipped_by()) == (80.0, 600.0, None, [])
    assert clip_planes(160.0, 300.0, 0.1, "auto").far == 600.0
    assert "behind the camera" in clip_planes(-1.0, 3.0, "auto", 30.0).problem
    assert "not before far plane" in clip_planes(80.0, 100.0, "auto", 30.0).problem


def test_a_dataset_in_cm_renders_with_far_auto_as_the_one_in_metres(tmp_path, ray_local):
    metres = make_source_dataset(tmp_path / "m", num_samples=4, image_size=RES)
    cm = make_source_dataset(tmp_path / "cm", num_samples=4, image_size=RES, unit=100.0)
    common = ["--resolution", str(RES), "--layers", "2"]
    # With the reference's planes (0.1, 30) the cm meshes, 4.5 m = 450 units away, are all clipped.
    code, output = render_cli(str(cm.root), str(tmp_path / "fixed"), *common)
    assert code != 0 and "no sample could be produced" in output
    for line in (tmp_path / "fixed" / FAILURES_NAME).read_text().splitlines():
        reason = json.loads(line)["reason"]
        assert "beyond the far plane (30)" in reason and "use --far auto" in reason
    code, output = render_cli(str(cm.root), str(tmp_path / "auto"), *common, "--far", "auto")
    assert code == 0 and "4 samples written, 0 failed" in output, output
    assert verify_store(tmp_path / "auto") == []
    assert load_manifest(tmp_path / "auto").columns["render"].config["far"] == "auto"
    code, output = render_cli(str(metres.root), str(tmp_path / "ref"), *common)
    assert code == 0, output
    got, want = stored_samples(tmp_path / "auto"), stored_samples(tmp_path / "ref")
    assert sorted(got) == sorted(want) == metres.ids
    for sid in metres.ids:
        a, b = got[sid]["dpm"], want[sid]["dpm"]
        np.testing.assert_array_equal(a[..., 6], b[..., 6])  # the same pixels and layers
        np.testing.assert_allclose(a[..., :6], 100 * b[..., :6], rtol=2e-3, atol=0.02)  # float16 storage
        np.testing.assert_array_equal(got[sid]["mask"], want[sid]["mask"])
        meta = got[sid]["meta"]
        assert meta["near"] == 0.1 and meta["far"] == pytest.approx(2 * meta["depth_range"][1], rel=1e-5)
        assert 300 < meta["depth_range"][0] < meta["depth_range"][1] < 600


def test_auto_clip_planes_give_the_same_maps_in_any_units(tmp_path):
    # Float32 maps straight from the renderer: auto planes change nothing but the scale.
    metres = make_source_dataset(tmp_path / "m", num_samples=3, rgb=False, masks=False)
    cm = make_source_dataset(tmp_path / "cm", num_samples=3, rgb=False, masks=False, unit=100.0)
    for sid in metres.ids:
        maps = []
        for ds, planes in ((metres, (0.1, 30.0)), (cm, ("auto", "auto"))):
            source = SourceDataset(ds.root)
            sample = source.sample(sid)
            mesh = load_skinned_mesh(source.layout.mesh(sample.model_name))
            posed = skin(mesh, read_pose_file(sample.pose_path, mesh.num_nodes))  # (1, V, 3)
            view = view_from_camera_pose(torch.tensor(sample.camera_pose)[None])  # (1, 4, 4)
            depth = -(posed[0].double() @ view[0, 2, :3] + view[0, 2, 3])  # (V,)
            clip = clip_planes(float(depth.min()), float(depth.max()), *planes)
            projection = projection_from_focal(torch.tensor(sample.focal_length, dtype=torch.float64),
                                               near=clip.near, far=clip.far)[None]
            canonical, faces = torch.tensor(mesh.vertices), torch.tensor(mesh.faces)
            maps.append(render_dual_pointmaps(canonical, posed, faces, view, projection, RES, 3,
                                              backend="cpu", workers=1)[0].numpy())
        np.testing.assert_array_equal(maps[1][..., 6], maps[0][..., 6])
        assert maps[0][..., 6].sum() > 20
        # Relative to the object's size: camera-space depth is float32 in the renderer, so "subtract
        # depth" leaves an error of about one float32 step of the camera distance, in either unit.
        np.testing.assert_allclose(maps[1][..., :6] / 100, maps[0][..., :6], rtol=1e-5,
                                   atol=1e-5 * TUBE_LENGTH)


def test_a_zarr_column_takes_one_image_size_and_says_so(tmp_path, ray_local):
    ds = make_source_dataset(tmp_path / "src", num_samples=3, image_size=24)
    odd = ds.ids[1]
    for folder, name in (("renders", f"{odd}_rgb.png"), ("masks", f"{odd}_mask.png")):
        image = Image.open(ds.root / folder / name)
        image.resize((20, 24)).save(ds.root / folder / name)
    out = tmp_path / "out"
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2", "--format", "zarr")
    assert code == 0, output
    assert "render: 2 samples written, 1 failed" in output
    failure = json.loads((out / FAILURES_NAME).read_text())
    assert failure["id"] == odd and "is 24x20, the Zarr render column stores 24x24" in failure["reason"]
    assert "--format webdataset" in failure["reason"]
    assert sorted(stored_samples(out)) == [ds.ids[0], ds.ids[2]]
    # A mask of another size than its image is refused in either format (issue 22, item 8: stretched over
    # it, it would cover other pixels).
    for sid in ds.ids:
        path = ds.root / "renders" / f"{sid}_rgb.png"
        Image.open(path).resize((40, 32)).save(path)
    for fmt in ("zarr", "webdataset"):
        code, output = render_cli(str(ds.root), str(tmp_path / fmt), "--resolution", str(RES), "--layers", "2",
                                  "--format", fmt)
        assert code == 1 and "no sample could be produced" in output, output
        reasons = {f["id"]: f["reason"] for f in map(json.loads, (tmp_path / fmt / FAILURES_NAME).read_text().splitlines())}
        for sid in (ds.ids[0], ds.ids[2]):
            assert reasons[sid] == (f"{ds.root / 'masks' / f'{sid}_mask.png'}: the mask is 24x24 pixels, its image "
                                    f"{sid}_rgb.png is 40x32: a mask must have its image's size")
    # WebDataset keeps every size (each mask with its image's).
    for sid in ds.ids:
        path = ds.root / "masks" / f"{sid}_mask.png"
        Image.open(path).resize((40, 32)).save(path)
    code, output = render_cli(str(ds.root), str(tmp_path / "wds"), "--resolution", str(RES), "--layers", "2",
                              "--format", "webdataset")
    assert code == 0 and "render: 3 samples written, 0 failed" in output


def _session_pids(sid: int) -> list[int]:
    """Processes of session `sid` (the killed run and everything it started, Ray workers included)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except ProcessLookupError:
                continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the run's processes")
def test_sigkill_partway_then_rerun_gives_every_sample_exactly_once(tmp_path):
    ds = make_source_dataset(tmp_path / "src", num_samples=48, models=2, rgb=False, masks=False)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline.cli", "render", str(ds.root), str(out), "--resolution", "160",
            "--layers", "8", "--shard-size", "8", "--workers", "1", "--format", "webdataset"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, not the tests'
    run = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("records/render/shard-*.json")):
            assert run.poll() is None, run.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.005)
    finally:
        # SIGKILL the whole session: the driver, Ray's daemons and its workers (own process groups).
        for pid in _session_pids(run.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.wait()
        run.stderr.close()
    records = sorted(out.glob("records/render/shard-*.json"))
    assert 1 <= len(records) < 6, "the run must be killed partway"
    column = load_manifest(out).columns["render"]  # saved before the first task started
    for tar in out.glob("render/shard-*.tar"):  # whatever has a final name is a complete shard
        index = int(tar.stem.split("-")[1])
        list(read_shard(out, column, index, verify=False))
        if (out / "records" / "render" / f"shard-{index:06d}.json").exists():
            assert check_shard(out / "render", index, "webdataset")[1] is None

    rerun = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "already complete" in rerun.stdout
    manifest = load_manifest(out)
    stored = [sid for plan in manifest.plan
              for sid, _ in read_shard(out, manifest.columns["render"], plan.index)]
    assert sorted(stored) == ds.ids and len(stored) == len(set(stored)) == 48
    assert verify_store(out) == []
    assert not [p for p in (out / "render").iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_second_writer_of_a_store_is_refused_naming_the_first_and_a_dead_one_holds_nothing(tmp_path, ray_local):
    # Issue 22, item 4: two `dualpm-prep render` on one OUT with different --resolution both exited 0, the
    # first run's output silently replaced. The first writer here is a process holding the store's lock as
    # `dualpm-prep render` does; the second (render or features) is refused naming it, before writing.
    import re
    import socket

    ds = make_source_dataset(tmp_path / "src", num_samples=4, models=1)
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
import sys, time
from dualpm.fileio import exclusive_lock
sys.argv = ["dualpm-prep", "render", {str(ds.root)!r}, {str(out)!r}, "--resolution", "16"]
with exclusive_lock({str(out / ".writer.lock")!r}, "held"):
    print("writing", flush=True)
    time.sleep(120)
"""
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    args = [str(ds.root), str(out), "--resolution", str(RES), "--layers", str(LAYERS), "--shard-size", "2"]
    try:
        assert holder.stdout.readline() == "writing\n"
        named = (rf"Error: {re.escape(str(out))}: another command is writing this store \(two writers would "
                 rf"replace each other's output\); wait for it to end or stop it \(dualpm-prep (render|features) "
                 rf"resumes; a writer that died releases the lock by itself\): held by pid {holder.pid} on host "
                 rf"{re.escape(socket.gethostname())} since \S+Z, command: dualpm-prep render {re.escape(str(ds.root))} "
                 rf"{re.escape(str(out))} --resolution 16 ")
        code, output = render_cli(*args)
        assert code == 1 and re.match(named, output), output
        result = CliRunner().invoke(main, ["features", str(ds.root), str(out), "--extractor", "rgb"])
        assert result.exit_code == 1 and re.match(named, result.output), result.output
        assert sorted(p.name for p in out.iterdir()) == [".writer.lock"]  # nothing else written
        assert render_cli(*args, "--dry-run")[0] == 0  # reading is not writing
    finally:
        holder.kill()  # kill -9: its lock file stays, the kernel released the lock
        holder.wait()
    code, output = render_cli(*args)
    assert code == 0 and "4 samples written" in output, output
    assert not (out / ".writer.lock").exists() and verify_store(out) == []


def test_a_mask_of_another_size_than_its_image_fails_its_sample_naming_both(tmp_path, ray_local):
    # Issue 22, item 8: with --format webdataset a mask of another size than its image was stored (and later
    # stretched over it) in silence.
    ds = make_source_dataset(tmp_path / "src", num_samples=3, models=1)
    odd = sample_id(1)
    mask_path = SourceDataset(ds.root).layout.mask(odd)
    mask = np.array(Image.open(mask_path))
    Image.fromarray(np.pad(mask, ((0, 0), (0, 16)))).save(mask_path)  # 64 x 80: same object, wider canvas
    out = tmp_path / "out"
    code, output = render_cli(str(ds.root), str(out), "--resolution", str(RES), "--layers", "2", "--format",
                              "webdataset")
    assert code == 0 and "2 samples written, 1 failed" in output, output
    reasons = {line["id"]: line["reason"] for line in map(json.loads, (out / FAILURES_NAME).read_text().splitlines())}
    assert reasons == {odd: f"{mask_path}: the mask is 80x64 pixels, its image {odd}_rgb.png is 64x64: a mask "
                            "must have its image's size"}
