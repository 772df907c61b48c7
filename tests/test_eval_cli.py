"""`dualpm-eval` end to end: ground truth scores exactly 0, a known rigid motion gives the known Chamfer and
ICP undoes it, skeletons from exact dual points recover the pose (and degrade gracefully with noise), the
constant baseline and its ratio, a missing source dataset.

One tiny dataset is prepared with the real stages (`dualpm-prep render` / `features` on the session's local
Ray). Its template cuts the datagen tube into three pieces, each moved by one bone only, so every rendered
point moves rigidly with its bone and a skeleton fit from exact dual points is exact. Predictions come from
`dualpm-infer --oracle` (the ground truth as the prediction); the Chamfer / ICP / Kabsch math itself is
tested in test_eval_metrics.py and test_skeleton.py.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh
import zarr
from click.testing import CliRunner
from datagen import cli_output as run
from datagen import make_source_dataset, tube_mesh
from PIL import Image

from dualpm.camera import view_from_camera_pose
from dualpm.data.source import Layout, SourceDataset
from dualpm.eval.baseline import fit_constant_baseline
from dualpm.eval.summary import RATIO_KEY
from dualpm.eval.cli import main as eval_main
from dualpm.gltf import SkinnedMesh, load_skinned_mesh, save_skinned_mesh
from dualpm.infer.cli import main as infer_main
from dualpm.pointcloud import write_ply
from dualpm.skinning import read_pose_file, skin
from dualpm.store import load_manifest
from dualpm.train import config_from_dict, train
from pipeline.cli import main as prep_main
from pipeline.store_commands import find_sample

RESOLUTION, LAYERS = 32, 3


def rigid_parts_mesh(name: str) -> SkinnedMesh:
    """datagen's tube armature with the tube cut into three separate pieces (gaps 0.24), piece k skinned to
    bone k alone: every surface point moves rigidly with one bone."""
    tube = tube_mesh(name, rings=8, segments=16)
    piece = tube.vertices * np.array([0.25, 1.0, 1.0], np.float32)  # x in [-0.33, 0.33]
    vertices = np.concatenate([piece + np.array([x, 0, 0], np.float32) for x in (-0.9, 0.0, 0.9)])
    faces = np.concatenate([tube.faces + k * len(piece) for k in range(3)])
    joints = np.zeros((len(vertices), 4), np.int64)
    joints[:, 0] = np.repeat(np.arange(3), len(piece))
    weights = np.zeros((len(vertices), 4), np.float32)
    weights[:, 0] = 1.0
    return dataclasses.replace(tube, vertices=vertices, faces=faces, joints=joints, weights=weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("evaldata")
    # No source masks: the stored mask is the rendered layer-1 coverage, exactly the ground truth's.
    ds = make_source_dataset(root / "src", num_samples=8, models=2, val=3, image_size=RESOLUTION, masks=False)
    for model in sorted(set(ds.model_of.values())):
        save_skinned_mesh(rigid_parts_mesh(model), Layout(ds.root).mesh(model))
    out = root / "out"
    run(prep_main, "render", ds.root, out, "--resolution", RESOLUTION, "--layers", LAYERS, "--shard-size", 4)
    run(prep_main, "features", ds.root, out, "--extractor", "rgb", "--grid", 8, "--workers", 1)
    return SimpleNamespace(src=ds.root, out=out, val=ds.val_ids)


@pytest.fixture(scope="module")
def oracle(data, tmp_path_factory):
    """dualpm-infer --oracle of the val split, with skeletons."""
    pred = tmp_path_factory.mktemp("oracle") / "pred"
    run(infer_main, "--oracle", "--data", data.out, "--out", pred, "--skeleton", "--no-sheets")
    return pred


def evaluate(pred: Path, out: Path, *args) -> tuple[dict, list[dict], str]:
    output = run(eval_main, "--pred", pred, "--out", out, *args)
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return json.loads((out / "summary.json").read_text()), rows, output


def gt_points(out: Path, sample_id: str) -> np.ndarray:
    """(N, 3) ground-truth posed points of every stored layer, straight from the render column."""
    dpm = find_sample(out, "render", sample_id)["dpm"]
    return dpm[..., 3:6][dpm[..., 6] > 0.5].astype(np.float64)


def test_ground_truth_as_prediction_scores_exactly_zero(data, oracle, tmp_path):
    summary, rows, output = evaluate(oracle, tmp_path / "ev", "--icp", "--surface-points", 20000)
    assert [r["id"] for r in rows] == data.val and summary["samples"] == 3
    model = summary["model"]
    layer_keys = [k for k in model if "chamfer_layers" in k]
    assert len(layer_keys) == 12  # 3 directions x (scene, unit cube) x (plain, ICP)
    assert all(model[k] == 0.0 for k in layer_keys), {k: model[k] for k in layer_keys}
    assert all(float(r["unit_chamfer_layers_sym"]) == 0.0 for r in rows)
    assert model["canonical_error"] == 0.0 and model["posed_error"] == 0.0
    assert [model[f"iou_l{k}"] for k in (1, 2, 3)] == [1.0, 1.0, 1.0]
    # The GT points lie on the posed mesh surface (camera space, depth subtracted): only the spacing of
    # the 20000 surface samples separates them from it.
    assert 0 < model["unit_chamfer_surface_pred_to_gt"] < 0.01
    assert model["points"] == model["gt_points"] > 50
    assert summary[RATIO_KEY] is None and summary["baseline"] is None  # no --baseline
    assert "| Chamfer sym., GT layers, unit cube | 0 |" in output
    assert (tmp_path / "ev" / "summary.md").read_text() in output
    assert (tmp_path / "ev" / "eval.config.yaml").exists()


def test_known_rigid_motion_gives_the_known_chamfer_and_icp_undoes_it(data, oracle, tmp_path):
    pred = tmp_path / "moved"
    shutil.copytree(oracle, pred)
    store = zarr.open_group(str(pred / "predictions.zarr"), mode="r+")
    angle = np.radians(8.0)
    rotation = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    shift = np.array([0.12, -0.05, 0.08])
    posed = store["posed"][...].astype(np.float64)  # (N, L, 3, H, W)
    moved = (np.einsum("ab,nlbhw->nlahw", rotation, posed) + shift[:, None, None]).astype(np.float16)
    store["posed"][...] = moved
    keep = (store["occupancy"][...] > 0.5) & (store["mask"][...][:, None] > 0)  # (N, L, H, W)

    summary, rows, _ = evaluate(pred, tmp_path / "ev", "--icp", "--surface-points", 0)
    assert not any("surface" in k for k in summary["model"])
    for i, row in enumerate(rows):
        points = np.moveaxis(moved[i].astype(np.float64), 1, -1)[keep[i]]  # (N, 3)
        target = gt_points(data.out, row["id"])
        distance = np.linalg.norm(points[:, None] - target[None], axis=-1)  # brute force, (N, M)
        pred_to_gt, gt_to_pred = distance.min(1).mean(), distance.min(0).mean()
        scale = 1.0 / (target.max(0) - target.min(0)).max()
        expected = {
            "chamfer_layers_pred_to_gt": pred_to_gt, "chamfer_layers_gt_to_pred": gt_to_pred,
            "chamfer_layers_sym": (pred_to_gt + gt_to_pred) / 2,
            "unit_chamfer_layers_sym": (pred_to_gt + gt_to_pred) / 2 * scale,
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-9), key
        assert float(row["chamfer_layers_sym"]) > 0.05
        # ICP finds the motion back, up to the float16 rounding of the moved points.
        assert float(row["icp_chamfer_layers_sym"]) < 2e-3
        # Per-pixel errors see the motion too; the canonical maps did not move.
        assert float(row["posed_error"]) > 0.05 and float(row["canonical_error"]) == 0.0


def _gt_posed_vertices(src: Path, out: Path, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) template vertices posed by the sample's pose file, in camera space with depth subtracted."""
    sample = SourceDataset(src).sample(sample_id)
    mesh = load_skinned_mesh(Layout(src).mesh(sample.model_name))
    world = skin(mesh, read_pose_file(sample.pose_path, mesh.num_nodes), dtype=torch.float64)[0].numpy()
    view = view_from_camera_pose(torch.from_numpy(sample.camera_pose)).numpy()
    camera = world @ view[:3, :3].T + view[:3, 3]
    camera[:, 2] -= view[2, 3]
    return camera, mesh.faces


def test_skeleton_from_exact_dual_points_recovers_the_pose_and_degrades_gracefully(data, tmp_path):
    errors = {}
    for noise in (0.0, 0.01, 0.04):
        pred = tmp_path / f"noise-{noise}"
        run(infer_main, "--oracle", "--oracle-noise", noise, "--data", data.out, "--out", pred, "--skeleton",
            "--no-sheets", "--no-ply")
        summary, rows, output = evaluate(pred, tmp_path / f"ev-{noise}", "--surface-points", 0)
        assert "skeleton rotation error, degrees" in output
        errors[noise] = np.array([summary["model"]["skeleton_rotation_deg"], summary["model"]["skeleton_position_error"]])
        assert sorted(summary["skeleton_per_joint"]) == ["bone0", "bone1", "bone2"]
        assert all(j["samples"] == 3 for j in summary["skeleton_per_joint"].values())
    # Exact dual points (float16 as stored): the pose comes back up to that rounding.
    assert errors[0.0][0] < 0.05 and errors[0.0][1] < 5e-4, errors
    # Noise of 1 and 4 cm on every point: errors grow with the noise, and stay small.
    assert (errors[0.0] < errors[0.01]).all() and (errors[0.01] < errors[0.04]).all(), errors
    assert errors[0.04][0] < 6.0 and errors[0.04][1] < 0.03, errors

    # The reposed template of the noise-free fit is the ground-truth posed mesh.
    pred = tmp_path / "exact"
    run(infer_main, "--oracle", "--data", data.out, "--out", pred, "--skeleton", "--no-sheets")
    for sample_id in data.val:
        reposed = trimesh.load(pred / "samples" / sample_id / "reposed.ply", process=False)
        expected, faces = _gt_posed_vertices(data.src, data.out, sample_id)
        np.testing.assert_array_equal(reposed.faces, faces)
        np.testing.assert_allclose(reposed.vertices, expected, atol=5e-3)


def test_baseline_is_the_per_pixel_training_mean_and_reports_a_ratio(data, oracle, tmp_path):
    summary, rows, output = evaluate(oracle, tmp_path / "ev", "--baseline", "--surface-points", 0)
    baseline = summary["baseline"]
    assert summary["baseline_samples"] == 5  # the 5 train samples
    assert baseline["unit_chamfer_layers_sym"] > 0.01
    assert summary[RATIO_KEY] == 0.0  # the oracle is perfect: 0 / baseline
    assert f"{RATIO_KEY} = 0" in output and "| metric | model | baseline |" in output
    assert float(rows[0]["baseline_unit_chamfer_layers_sym"]) > 0
    assert "baseline" in summary["ratio_definition"]

    # The baseline is the per-pixel mean over the train samples occupied there, and the occupancy frequency.
    train = [i for p in load_manifest(data.out).plan if p.split == "train" for i in p.ids]
    maps = np.stack([find_sample(data.out, "render", i)["dpm"] for i in train])  # (N, H, W, L, 7)
    occupied = maps[..., 6] > 0.5
    counts = occupied.sum(0)  # (H, W, L)
    fitted = fit_constant_baseline(data.out, LAYERS, (RESOLUTION, RESOLUTION))
    assert fitted.samples == len(train) == 5
    np.testing.assert_allclose(fitted.frequency, np.moveaxis(counts / len(train), -1, 0), rtol=1e-6)
    for channels, mean in ((slice(0, 3), fitted.canonical), (slice(3, 6), fitted.posed)):
        sums = np.where(occupied[..., None], maps[..., channels], 0).sum(0)  # (H, W, L, 3)
        expected = sums / np.maximum(counts, 1)[..., None]
        np.testing.assert_allclose(mean, np.transpose(expected, (2, 3, 0, 1)), rtol=1e-5, atol=1e-6)


def test_missing_source_skips_surface_and_skeleton_with_a_note(data, oracle, tmp_path):
    summary, _, output = evaluate(oracle, tmp_path / "ev", "--source", tmp_path / "nowhere")
    assert not any("surface" in k or "skeleton" in k for k in summary["model"])
    assert any("source dataset unavailable" in note for note in summary["notes"])
    assert "Notes:" in output and summary["model"]["chamfer_layers_sym"] == 0.0


def test_errors_and_dry_run(data, oracle, tmp_path):
    result = CliRunner().invoke(eval_main, ["--pred", str(tmp_path)])
    assert result.exit_code == 1 and "no predictions.zarr" in result.output
    run(eval_main, "--pred", oracle, "--out", tmp_path / "dry", "--dry-run")
    assert not (tmp_path / "dry").exists()
    assert RATIO_KEY in run(eval_main, "--help")  # documented where users look


# ---------------------------------------------------------------- protocols: animodel, pair

FEW = ["--chamfer-points", 4000, "--align-points", 800, "--min-cubes", 40]  # fewer points, coarser voxels: seconds


def test_animodel_protocol_scores_the_world_frame_points_against_the_posed_mesh(data, oracle, tmp_path):
    summary, rows, output = evaluate(oracle, tmp_path / "ev", "--protocol", "animodel", *FEW)
    assert summary["protocol"] == "animodel" and "Animodel benchmark protocol" in summary["protocol_definition"]
    assert "protocol animodel" in output and "| Animodel Chamfer bidir., unit cube |" in output
    assert not any(k.startswith(("chamfer_layers", "iou_")) for k in summary["model"])  # dualpm's are not run
    assert [r["id"] for r in rows] == data.val
    # Exact points on the GT surface, but few (32 px, 3 layers, three thin tubes): within 6% of the size.
    assert all(0 < float(row["animodel_unit_chamfer_sym"]) < 0.06 for row in rows)
    # The protocol is blind to a similarity transform of the prediction (volume rescale, then ICP): the same
    # points scaled 1.6x about the camera give the same numbers up to the voxel grid's discretisation.
    scaled = tmp_path / "scaled"
    shutil.copytree(oracle, scaled)
    posed = zarr.open_array(scaled / "predictions.zarr" / "posed", mode="r+")
    posed[...] = (posed[...].astype(np.float32) * 1.6).astype(np.float16)
    _, scaled_rows, _ = evaluate(scaled, tmp_path / "ev_scaled", "--protocol", "animodel", *FEW)
    for row, other in zip(rows, scaled_rows, strict=True):
        assert float(other["animodel_volume_scale"]) == pytest.approx(float(row["animodel_volume_scale"]) / 1.6,
                                                                     rel=0.01)
        assert float(other["animodel_unit_chamfer_sym"]) == pytest.approx(float(row["animodel_unit_chamfer_sym"]),
                                                                         rel=0.05)
        # (ICP alone is rigid: without the volume rescale the 1.6x cloud could not be brought onto the target.)
    serial, serial_rows, _ = evaluate(oracle, tmp_path / "serial", "--protocol", "animodel", "--workers", "1", *FEW)
    assert serial_rows == rows and serial["model"] == summary["model"]  # the worker processes change nothing
    camera, _, _ = evaluate(oracle, tmp_path / "camera", "--protocol", "animodel", "--frame", "camera", *FEW)
    assert camera["model"]["animodel_chamfer_sym"] != summary["model"]["animodel_chamfer_sym"]


def test_animodel_targets_folder_with_predictions_from_images(data, tmp_path):
    """Animodel's layout (<category>/images/<id>.png, <category>/meshes/<id>.obj): dualpm-infer --images on
    the images (RGBA: the alpha is the mask), dualpm-eval --targets on the category, matched by id."""
    category = tmp_path / "animodel" / "horse"
    (category / "images").mkdir(parents=True)
    (category / "meshes").mkdir()
    for sample_id in data.val:
        rgb = np.asarray(Image.open(data.src / "renders" / f"{sample_id}_rgb.png").convert("RGB"))
        alpha = find_sample(data.out, "render", sample_id)["dpm"][:, :, 0, 6] > 0.5
        rgba = np.dstack([rgb, (alpha * 255).astype(np.uint8)])
        Image.fromarray(rgba, "RGBA").save(category / "images" / f"{sample_id}.png")
        vertices, faces = _gt_posed_vertices(data.src, data.out, sample_id)
        trimesh.Trimesh(vertices, faces).export(category / "meshes" / f"{sample_id}.obj")
    shutil.copy(category / "meshes" / f"{data.val[0]}.obj", category / "meshes" / "999999.obj")  # no image
    raw = {
        "data": {"root": str(data.out), "batch_size": 4, "loader_workers": 0, "shuffle_buffer": 0},
        "model": {"in_channels": 3, "num_layers": LAYERS, "unet": {
            "base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [],
            "dropout": 0.0, "num_groups": 4}},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 2, "validate_every": 0, "progress": False},
    }
    checkpoint = train(config_from_dict(raw), verbose=False).checkpoint
    pred = tmp_path / "pred"
    # An untrained model: keep every in-mask point so that the clouds are not empty.
    run(infer_main, "--checkpoint", checkpoint, "--images", category / "images", "--masks", category / "images",
        "--out", pred, "--occupancy-threshold", 0, "--confidence-threshold", 1, "--no-sheets", "--no-ply")
    assert "--data DATASET" in run(eval_main, "--pred", pred, exit_code=1)  # dualpm needs a dataset
    summary, rows, output = evaluate(pred, tmp_path / "ev", "--protocol", "animodel", "--targets", category,
                                     "--frame", "camera", *FEW)
    assert [r["id"] for r in rows] == data.val and summary["samples"] == 3
    assert summary["protocol"] == "animodel" and summary["data"] == str(category)
    assert any("1 target meshes have no prediction" in n and "999999" in n for n in summary["notes"])
    assert all(np.isfinite(float(r["animodel_unit_chamfer_sym"])) for r in rows)
    assert all(float(r["points"]) > 0 for r in rows)
    # The default frame for targets is the rest-pose orientation (no cameras in Animodel's data).
    canonical, _, _ = evaluate(pred, tmp_path / "canonical", "--protocol", "animodel", "--targets",
                               category / "meshes", *FEW)
    assert canonical["config"]["frame"] == "canonical"
    assert "needs each sample's camera" in run(eval_main, "--pred", pred, "--protocol", "animodel", "--targets",
                                               category, "--frame", "world", exit_code=1)
    assert "for --protocol animodel only" in run(eval_main, "--pred", pred, "--targets", category, exit_code=1)


def test_pair_scores_any_reconstruction_file(tmp_path):
    target = trimesh.creation.capsule(height=1.2, radius=0.3, count=[16, 16])
    target.vertices[:, 0] += 0.3 * np.clip(target.vertices[:, 2], 0, None) ** 2  # not symmetric about Y
    target.export(tmp_path / "target.obj")
    moved = target.copy()
    moved.apply_translation([0.05, -0.02, 0.03])
    moved.export(tmp_path / "recon.glb")
    write_ply(tmp_path / "points.ply", target.sample(3000, seed=0))
    first = json.loads(run(eval_main, "pair", tmp_path / "recon.glb", tmp_path / "target.obj", "--json", *FEW))
    again = json.loads(run(eval_main, "pair", tmp_path / "recon.glb", tmp_path / "target.obj", "--json", *FEW))
    assert first == again and first["protocol"] == "animodel"  # deterministic for the seed
    metrics = first["metrics"]
    assert metrics["volume_scale"] == pytest.approx(1.0, abs=0.02) and metrics["enclosed"] == 1.0
    assert metrics["unit_chamfer_sym"] == pytest.approx(metrics["chamfer_sym"] / target.extents.max())
    assert metrics["unit_chamfer_sym"] < 0.01  # ICP undid the shift: the sampling floor
    other = json.loads(run(eval_main, "pair", tmp_path / "recon.glb", tmp_path / "target.obj", "--json",
                           "--seed", 1, *FEW))
    assert other["metrics"]["chamfer_sym"] != metrics["chamfer_sym"]
    text = run(eval_main, "pair", tmp_path / "points.ply", tmp_path / "target.obj", *FEW)
    assert "protocol: animodel" in text and "closed surface: True" in text
    dualpm = json.loads(run(eval_main, "pair", tmp_path / "points.ply", tmp_path / "target.obj", "--protocol",
                            "dualpm", "--json", "--surface-points", 3000))
    assert dualpm["protocol"] == "dualpm" and dualpm["metrics"]["chamfer_sym"] < 0.05
    assert set(dualpm["metrics"]) >= {"icp_unit_chamfer_sym", "unit_chamfer_pred_to_gt"}
    bad = run(eval_main, "pair", tmp_path / "points.ply", tmp_path / "points.ply", exit_code=1)
    assert "a target must be a triangle mesh" in bad
    (tmp_path / "broken.obj").write_text("v 0 0 0\nf 1 2 3\n")
    assert "broken.obj" in run(eval_main, "pair", tmp_path / "broken.obj", tmp_path / "target.obj", exit_code=1)


def test_pair_refuses_meshes_that_lie(tmp_path):
    # Issue 22, item 9: an ASCII PLY whose header promises more vertices than it holds was scored (a face line
    # read as a vertex), NaN vertices gave silent garbage, a target with holes was rescaled by its meaningless
    # "volume".
    target = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    target.export(tmp_path / "target.obj")
    target.export(tmp_path / "recon.obj")
    # ASCII PLY of a tetrahedron whose header says 5 vertices: the first face line would be vertex 5.
    rows = ["0 0 0", "1 0 0", "0 1 0", "0 0 1", "3 0 1 2", "3 0 1 3", "3 0 2 3", "3 1 2 3"]
    header = ["ply", "format ascii 1.0", "element vertex 5", "property float x", "property float y",
              "property float z", "element face 4", "property list uchar int vertex_indices", "end_header"]
    (tmp_path / "lies.ply").write_text("\n".join(header + rows) + "\n")
    output = run(eval_main, "pair", tmp_path / "lies.ply", tmp_path / "target.obj", *FEW, exit_code=1)
    assert output == (f"Error: {tmp_path / 'lies.ply'}: the header declares 5 vertex, 4 face rows (9 lines), the "
                      "body holds 8 lines: the file is inconsistent (truncated or edited)\n")
    header[2] = "element vertex 4"
    (tmp_path / "short_row.ply").write_text("\n".join(header + ["0 0", *rows[1:]]) + "\n")
    output = run(eval_main, "pair", tmp_path / "short_row.ply", tmp_path / "target.obj", *FEW, exit_code=1)
    assert "vertex row 0 holds 2 values, the header's properties need 3" in output
    (tmp_path / "honest.ply").write_text("\n".join(header + rows) + "\n")
    run(eval_main, "pair", tmp_path / "honest.ply", tmp_path / "target.obj", "--protocol", "dualpm",
        "--surface-points", 500)
    # NaN vertices: refused, counted.
    lines = (tmp_path / "recon.obj").read_text().splitlines()
    vertex_lines = [i for i, line in enumerate(lines) if line.startswith("v ")]
    for i in vertex_lines[:3]:
        lines[i] = "v nan 0 0"
    (tmp_path / "nan.obj").write_text("\n".join(lines) + "\n")
    for pred, tgt in ((tmp_path / "nan.obj", tmp_path / "target.obj"), (tmp_path / "recon.obj", tmp_path / "nan.obj")):
        output = run(eval_main, "pair", pred, tgt, *FEW, exit_code=1)
        assert output == (f"Error: {tmp_path / 'nan.obj'}: 3 of {len(vertex_lines)} vertices are not finite (NaN or "
                          "inf): the file is damaged (dropping them would change the shape: fix or re-export it)\n")
    # A target with a hole wider than a voxel: no volume, refused for the rescale; --no-rescale scores it,
    # and the output says the target is not watertight.
    holed = target.copy()
    holed.update_faces(holed.vertices[holed.faces].mean(axis=1)[:, 1] < 0.35)  # the cap above y = 0.35 removed
    holed.remove_unreferenced_vertices()
    holed.export(tmp_path / "holed.obj")
    output = run(eval_main, "pair", tmp_path / "recon.obj", tmp_path / "holed.obj", *FEW, exit_code=1)
    assert output.startswith(f"Error: {tmp_path / 'holed.obj'}: the mesh encloses no volume at the protocol's "
                             "voxel pitch") and "--no-rescale" in output and output.count("\n") == 1
    text = run(eval_main, "pair", tmp_path / "recon.obj", tmp_path / "holed.obj", "--no-rescale", *FEW)
    assert "target: not watertight" in text
    report = json.loads(run(eval_main, "pair", tmp_path / "recon.obj", tmp_path / "holed.obj", "--no-rescale",
                            "--json", *FEW))
    assert report["metrics"]["target_watertight"] == 0.0 and report["metrics"]["volume_scale"] == 1.0
    assert json.loads(run(eval_main, "pair", tmp_path / "recon.obj", tmp_path / "target.obj", "--json", *FEW)
                      )["metrics"]["target_watertight"] == 1.0
