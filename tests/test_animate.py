"""dualpm-animate: the exporters on known poses (GLB, BVH, published layout) and the command end to end on
oracle predictions of a known sequence. Expectations come from our skinning of the known poses, the Khronos
validator, a BVH parser written in tests/animate_helpers.py (checked against a hand-written file) and hand
numbers."""

from __future__ import annotations

import json
import numpy as np
import pygltflib
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from animate_helpers import (
    bvh_positions,
    fancy_rig,
    known_poses,
    parse_bvh,
    read_glb_animation,
    validate_glb,
    write_predictions,
)
from datagen import tube_mesh
from dualpm.animate.bvh import bvh_text
from dualpm.animate.cli import main
from dualpm.animate.fit import CameraTrack
from dualpm.skeleton.fit import local_pose_from_skinning
from dualpm.skeleton.kinematics import RigTree
from dualpm.animate.glb import continuous_quaternions, export_glb
from dualpm.gltf import load_skinned_mesh, save_skinned_mesh, scaled_mesh
from dualpm.skinning import global_matrices, joint_matrices, read_pose_file, skin

FRAMES = 6


def body_size(mesh) -> float:
    return float(np.ptp(mesh.vertices, axis=0).max())


def animate(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_glb_round_trip_reproduces_the_posed_vertices_in_the_rigs_own_units(tmp_path):
    rig_path = fancy_rig(tmp_path / "rig")
    user = load_skinned_mesh(rig_path)
    factor = 0.5  # as if synth had scaled the rig by 0.5: the poses are in those units
    fitted = scaled_mesh(user, factor)
    poses = known_poses(fitted, FRAMES)
    poses[2:, 1, :4] *= -1  # the same rotations with a sign flip in the middle: the file must not flip
    camera = CameraTrack(np.full(FRAMES, 50.0), 1.5, -np.linspace(4.0, 5.0, FRAMES))
    summary = export_glb(rig_path, tmp_path / "a.glb", poses, fps=12, scale=factor, camera=camera)
    assert summary["embedded_images"] == 1 and summary["animated_nodes"] == 3
    validate_glb(tmp_path / "a.glb")

    exported = load_skinned_mesh(tmp_path / "a.glb")
    assert exported.num_nodes == user.num_nodes + 1  # the camera node
    back, channels, doc = read_glb_animation(tmp_path / "a.glb", exported.num_nodes)
    expected = skin(fitted, poses, dtype=torch.float64) / factor
    got = skin(exported, back, dtype=torch.float64)
    assert (got - expected).abs().max() < 1e-5 * body_size(user)
    times, rotation = channels[(1, "rotation")]
    np.testing.assert_allclose(times, np.arange(FRAMES) / 12, atol=1e-7)
    assert (np.einsum("fi,fi->f", rotation[1:], rotation[:-1]) > 0).all()  # continuous, no sign flip
    assert {path for node, path in channels if node == 2} == {"translation", "rotation", "scale"}
    np.testing.assert_allclose(channels[(2, "scale")][1], 1.5, rtol=1e-6)  # the matrix node's own scale
    # The camera: perspective of the focal length and aspect, at (0, 0, -view_z) in rig units.
    cam_node = summary["camera_node"]
    perspective = doc.cameras[doc.nodes[cam_node].camera].perspective
    assert perspective.yfov == pytest.approx(2 * np.arctan(18 / 50.0)) and perspective.aspectRatio == 1.5
    np.testing.assert_allclose(channels[(cam_node, "translation")][1][:, 2], np.linspace(8.0, 10.0, FRAMES),
                               rtol=1e-6)
    assert cam_node in doc.scenes[doc.scene].nodes
    # Everything else as given: mesh, skin, other nodes, extras; the image embedded byte for byte.
    original = json.loads(rig_path.read_text())
    assert doc.meshes[0].name == original["meshes"][0]["name"] and len(doc.meshes) == 1
    assert doc.skins[0].joints == original["skins"][0]["joints"]
    assert doc.nodes[0].mesh == 0 and doc.nodes[0].skin == 0 and doc.extras == {"author": "test"}
    image = doc.images[0]
    view = doc.bufferViews[image.bufferView]
    data = doc.binary_blob()[view.byteOffset : view.byteOffset + view.byteLength]
    assert data == (rig_path.parent / "tex 1.png").read_bytes() and image.mimeType == "image/png"


def test_quaternions_are_made_continuous_without_changing_the_rotations():
    quat = np.array([[1.0, 0, 0, 0], [-0.9, -0.1, 0, 0], [0.8, 0.2, 0, 0], [-0.7, -0.3, 0, 0]])
    out = continuous_quaternions(quat[:, None])[:, 0]
    np.testing.assert_array_equal(out, [[1, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0.7, 0.3, 0, 0]])


def test_joint_transforms_convert_to_local_poses_that_skin_identically():
    rig = load_skinned_mesh_tube()
    poses = known_poses(rig, FRAMES, seed=3)
    matrices = joint_matrices(rig, torch.from_numpy(poses)).numpy()
    tree = RigTree.of(rig)
    back = np.stack([local_pose_from_skinning(tree, frame) for frame in matrices])
    np.testing.assert_allclose(skin(rig, back, dtype=torch.float64), skin(rig, poses, dtype=torch.float64),
                               atol=1e-12)


def load_skinned_mesh_tube():
    return tube_mesh("tube")


HAND_BVH = """HIERARCHY
ROOT hip
{
  OFFSET 0 0 0
  CHANNELS 6 Xposition Yposition Zposition Zrotation Xrotation Yrotation
  JOINT knee
  {
    OFFSET 1 0 0
    CHANNELS 3 Zrotation Xrotation Yrotation
    End Site
    {
      OFFSET 0 1 0
    }
  }
}
MOTION
Frames: 2
Frame Time: 0.5
1 2 3 90 0 0 0 90 0
0 0 0 0 0 0 0 0 0
"""


def test_the_bvh_parser_reads_a_hand_written_file():
    joints, values, frame_time = parse_bvh(HAND_BVH)
    assert [j["name"] for j in joints] == ["hip", "knee", "End"] and frame_time == 0.5
    positions = bvh_positions(joints, values)
    # Frame 0: hip at (1, 2, 3) turned 90 deg about Z; knee = hip + Rz (1, 0, 0) = (1, 3, 3); the end site:
    # knee + Rz Rx (0, 1, 0) = (1, 3, 3) + Rz (0, 0, 1) = (1, 3, 4). Frame 1: the rest pose.
    np.testing.assert_allclose(positions[0], [[1, 2, 3], [1, 3, 3], [1, 3, 4]], atol=1e-12)
    np.testing.assert_allclose(positions[1], [[0, 0, 0], [1, 0, 0], [1, 1, 0]], atol=1e-12)


def test_bvh_joints_land_where_skinning_puts_them_in_the_rigs_units():
    user = tube_mesh("tube")
    factor = 2.0
    fitted = scaled_mesh(user, factor)
    poses = known_poses(fitted, FRAMES, seed=1, max_angle=2.5)  # large angles: Euler unwrapping is exercised
    joints, values, frame_time = parse_bvh(bvh_text(fitted, poses, fps=30, scale=factor))
    assert frame_time == pytest.approx(1 / 30) and len(values) == FRAMES
    named = [j for j in joints if j["name"] != "End"]
    assert [j["name"] for j in named] == ["bone0", "bone1", "bone2"]
    assert named[0]["channels"][3:] == ["Zrotation", "Xrotation", "Yrotation"]
    world = global_matrices(fitted, torch.from_numpy(poses)).numpy()[:, fitted.joint_nodes][..., :3, 3] / factor
    got = bvh_positions(joints, values)[:, [i for i, j in enumerate(joints) if j["name"] != "End"]]
    np.testing.assert_allclose(got, world, atol=1e-6 * body_size(user))


def test_bvh_refuses_a_skin_with_two_root_joints_in_one_line():
    from dataclasses import replace

    from dualpm.errors import GltfError

    rig = replace(tube_mesh("tube"), parents=np.array([-1, -1, -1, 2]))  # bone1 detached from bone0
    with pytest.raises(GltfError, match=r"BVH needs one root joint, the skin has 2 \(bone0, bone1\)"):
        bvh_text(rig, known_poses(rig, 2), fps=24)


def unsmoothed(tmp_path):
    """The fixture's rig, no smoothing: its frames are independent random poses, not a motion."""
    return "--rig", tmp_path / "tube.glb", "--smooth", "none"


@pytest.fixture
def oracle_sequence(tmp_path):
    """A rig file, oracle predictions of a known 5-frame sequence and what made them."""
    rig = tube_mesh("tube")
    save_skinned_mesh(rig, tmp_path / "tube.glb")
    rig = load_skinned_mesh(tmp_path / "tube.glb")
    poses = known_poses(rig, 5, seed=2, max_angle=0.5)
    views, ids = write_predictions(tmp_path / "preds", rig, poses, focal=50.0,
                                   ids=["frame10", "frame2", "frame1", "frame3", "frame4"])
    return tmp_path, rig, poses, views, ids


def test_the_command_fits_exports_and_writes_the_layout(oracle_sequence):
    tmp_path, rig, poses, views, _ = oracle_sequence
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path),
                           "--fps", 10, "--focal-length", "shared")
    assert code == 0, output
    out = tmp_path / "anim"
    report = json.loads((out / "fit.json").read_text())
    order = ["frame1", "frame2", "frame3", "frame4", "frame10"]  # natural sort
    assert report["ids"] == order and [f["id"] for f in report["frames"]] == order
    truth_index = [2, 1, 3, 4, 0]  # where each ordered frame sits in the written store
    first = report["frames"][0]["joints"]
    assert [j["joint"] for j in first] == ["bone0", "bone1", "bone2"]
    assert all(j["status"] == "fitted" and j["points"] > 10 and j["residual"] < 0.02 * body_size(rig)
               for j in first)  # per-bone rigid fits of blended (LBS) points: not exact
    np.testing.assert_allclose(report["camera"]["focal_length_mm"], 50.0, rtol=0.01)  # shared: one for all
    assert report["camera"]["focal_source"] == "estimated (shared) from the predicted points"
    np.testing.assert_allclose(report["camera"]["view_z"], views[truth_index, 2, 3], rtol=0.01)
    validate_glb(out / "animation.glb")
    # The fitted poses skin to the predictions' frame: camera space minus view[2, 3].
    size = body_size(rig)
    truth = skin(rig, poses[truth_index], dtype=torch.float64).numpy()
    homogeneous = np.concatenate([truth, np.ones(truth.shape[:2] + (1,))], axis=2)
    camera = np.einsum("fij,fvj->fvi", views[truth_index], homogeneous)[..., :3]
    camera[..., 2] -= views[truth_index, 2, 3][:, None]
    for index, sample_id in enumerate(order):
        pose = read_pose_file(out / "poses" / f"{sample_id}_pose.npz", rig.num_nodes)
        posed = skin(load_skinned_mesh(out / "shapes" / "tube" / "tube_shape.gltf"), pose, dtype=torch.float64)
        # Per-bone Kabsch (the baseline fit) on float16 maps: about 1% of the body at worst here.
        assert np.abs(posed[0].numpy() - camera[index]).max() < 0.02 * size
        assert (out / "cameras" / f"{sample_id}_camera.txt").is_file()
        assert "focal_length" in (out / "metadata" / f"{sample_id}_metadata.txt").read_text()
    back, _, _ = read_glb_animation(out / "animation.glb", rig.num_nodes)
    glb_posed = skin(rig, back, dtype=torch.float64).numpy()
    assert np.abs(glb_posed - camera).max() < 0.02 * size
    joints, values, _ = parse_bvh((out / "animation.bvh").read_text())
    assert len(values) == 5 and "Frame Time: 0.1" in (out / "animation.bvh").read_text()
    assert (out / "animate.config.yaml").is_file()
    with Image.open(out / "preview.png") as preview:  # inputs unknown (no image folder): the renders only
        assert preview.size[0] > 4 * preview.size[1]  # one row of 5 frames


def test_the_preview_renders_match_the_predicted_silhouettes(oracle_sequence):
    from dualpm.animate.fit import estimate_cameras, fit_frames
    from dualpm.animate.inputs import read_frames
    from dualpm.animate.preview import shaded_renders
    from dualpm.predictions import open_predictions

    tmp_path, rig, _, _, _ = oracle_sequence
    preds = open_predictions(tmp_path / "preds")
    frames = read_frames(preds, preds.ids)
    renders = shaded_renders(rig, fit_frames(rig, frames).poses, estimate_cameras(frames, 1.0), 48)
    for row, image in enumerate(renders):
        predicted = preds.sample(row).mask > 0
        drawn = (image < 250).any(axis=-1)  # not the white background
        assert (predicted & drawn).sum() / (predicted | drawn).sum() > 0.95


def test_per_frame_focal_lengths_are_recovered_and_the_glb_camera_keeps_the_image_size(tmp_path):
    rig = tube_mesh("tube")
    save_skinned_mesh(rig, tmp_path / "tube.glb")
    focal = np.array([35.0, 50.0, 80.0])
    views, ids = write_predictions(tmp_path / "preds", rig, known_poses(rig, 3), focal=focal)
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path),
                           "--focal-length", "per-frame")
    assert code == 0, output
    camera = json.loads((tmp_path / "anim" / "fit.json").read_text())["camera"]
    np.testing.assert_allclose(camera["focal_length_mm"], focal, rtol=0.01)
    np.testing.assert_allclose(camera["view_z"], views[:, 2, 3], rtol=0.01)
    assert [float(f.read_text().split("focal_length: ")[1].split()[0]) for f in
            sorted((tmp_path / "anim" / "metadata").iterdir())] == pytest.approx(camera["focal_length_mm"])
    _, channels, doc = read_glb_animation(tmp_path / "anim" / "animation.glb", rig.num_nodes)
    node = next(i for i, n in enumerate(doc.nodes) if n.camera is not None)
    assert doc.cameras[0].perspective.yfov == pytest.approx(2 * np.arctan(18 / camera["focal_length_mm"][1]))
    # One field of view (the median focal length, 50 mm): frame k seen from distance d_k * 50 / f_k.
    expected = -np.array(camera["view_z"]) * camera["focal_length_mm"][1] / np.array(camera["focal_length_mm"])
    np.testing.assert_allclose(channels[(node, "translation")][1][:, 2], expected, rtol=1e-6)
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "fixed", *unsmoothed(tmp_path),
                           "--focal-length", "50")
    assert code == 0, output
    camera = json.loads((tmp_path / "fixed" / "fit.json").read_text())["camera"]
    assert camera["focal_length_mm"] == [50.0, 50.0, 50.0]
    np.testing.assert_allclose(camera["view_z"][1], views[1, 2, 3], rtol=0.01)


def test_the_fitted_layout_renders_the_predicted_silhouettes(oracle_sequence, ray_local):
    from pipeline.cli import main as prep

    from dualpm.predictions import open_predictions

    tmp_path, rig, _, _, _ = oracle_sequence
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path))
    assert code == 0, output
    result = CliRunner().invoke(prep, ["render", str(tmp_path / "anim"), str(tmp_path / "store"), "--resolution",
                                       "48", "--layers", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from dualpm.store import load_manifest, read_shard

    manifest = load_manifest(tmp_path / "store")
    rendered = {sid: fields["mask"] for plan in manifest.plan
                for sid, fields in read_shard(tmp_path / "store", manifest.columns["render"], plan.index)}
    preds = open_predictions(tmp_path / "preds")
    for row, sample_id in enumerate(preds.ids):
        predicted = preds.sample(row).mask > 0
        mask = rendered[sample_id] > 0
        iou = (predicted & mask).sum() / (predicted | mask).sum()
        assert iou > 0.97, (sample_id, iou)


def test_without_dataset_or_option_the_focal_length_is_the_default(oracle_sequence):
    tmp_path, _, _, views, _ = oracle_sequence
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path))
    assert code == 0, output
    camera = json.loads((tmp_path / "anim" / "fit.json").read_text())["camera"]
    assert camera["focal_length_mm"] == [50.0] * 5 and camera["focal_source"] == "the default"
    np.testing.assert_allclose(sorted(camera["view_z"]), sorted(views[:, 2, 3]), rtol=0.01)  # focal 50 is right


def test_dry_run_resolves_and_writes_nothing(oracle_sequence):
    tmp_path = oracle_sequence[0]
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path),
                           "--dry-run")
    assert code == 0, output
    assert "5 frames would be fitted" in output and not (tmp_path / "anim").exists()


def test_order_file_picks_and_orders_frames(oracle_sequence):
    tmp_path = oracle_sequence[0]
    (tmp_path / "order.txt").write_text("frame4\nframe1\nframe10\n")
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path),
                           "--order", tmp_path / "order.txt")
    assert code == 0, output
    assert json.loads((tmp_path / "anim" / "fit.json").read_text())["ids"] == ["frame4", "frame1", "frame10"]
    (tmp_path / "bad.txt").write_text("frame4\nnope\n")
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "x", *unsmoothed(tmp_path),
                           "--order", tmp_path / "bad.txt")
    assert code == 1 and "bad.txt: 1 ids have no prediction (e.g. 'nope')" in output


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def test_a_rig_without_a_skin_is_one_clear_line(oracle_sequence):
    tmp_path = oracle_sequence[0]
    save_skinned_mesh(tube_mesh("tube"), tmp_path / "plain.gltf")
    doc = json.loads((tmp_path / "plain.gltf").read_text())
    del doc["skins"]
    del doc["nodes"][0]["skin"]
    (tmp_path / "plain.gltf").write_text(json.dumps(doc))
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", "--rig", tmp_path / "plain.gltf")
    assert code == 1 and "plain.gltf: the file has no skin" in one_line_error(output)


def test_poses_of_another_node_count_are_refused(tmp_path):
    save_skinned_mesh(tube_mesh("tube"), tmp_path / "tube.glb")
    with pytest.raises(Exception, match=r"do not fit its 4 nodes"):
        export_glb(tmp_path / "tube.glb", tmp_path / "a.glb", np.zeros((2, 5, 7)), fps=24)


def test_predictions_and_rig_with_different_joint_counts_is_one_clear_line(tmp_path, monkeypatch):
    from dualpm.animate import cli, inputs

    rig = tube_mesh("tube")
    save_skinned_mesh(rig, tmp_path / "tube.gltf")
    write_predictions(tmp_path / "preds", rig, known_poses(rig, 2))
    other = tube_mesh("other")
    two = type(other)(**{**other.__dict__, "joints": np.minimum(other.joints, 1), "joint_nodes": [1, 2],
                         "inverse_bind": other.inverse_bind[:2]})
    save_skinned_mesh(two, tmp_path / "two.gltf")
    # The predictions were made for the template tube.gltf (as found through the dataset).
    monkeypatch.setattr(cli, "find_template", lambda preds, ids: inputs.Template(tmp_path / "tube.gltf", "tube", 1.0))
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", "--rig", tmp_path / "two.gltf")
    assert code == 1
    assert "two.gltf: has 2 joints but the predictions were made for" in one_line_error(output)


def test_a_rig_in_other_units_than_the_predictions_is_one_clear_line(oracle_sequence):
    tmp_path = oracle_sequence[0]
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path),
                           "--mesh-scale", "0.1")
    assert code == 1
    assert "frame frame1: 100% of the predicted canonical points lie farther than 20%" in one_line_error(output)


def test_a_joint_without_points_inherits_its_parents_motion_and_says_so():
    from dualpm.animate.fit import Observation, fit_frames

    rig = tube_mesh("tube")
    poses = known_poses(rig, 2, seed=4)
    # Joint 2 (node 3, the tip) gets no points.
    keep = np.flatnonzero(rig.vertices[:, 0] < 0.3)  # vertices whose dominant bone is bone0 or bone1
    posed = skin(rig, poses, dtype=torch.float64).numpy()
    frames = [Observation(rig.vertices[keep], p[keep], np.ones(len(keep))) for p in posed]
    assert [j["status"] for j in fit_frames(rig, frames, ids=["a", "b"]).joints[0]] == ["fitted", "fitted", "rest"]
    fit = fit_frames(rig, frames, ids=["a", "b"], method="kabsch")
    assert [j["status"] for j in fit.joints[0]] == ["fitted", "fitted", "inherited"]
    assert fit.joints[0][2]["points"] == 0 and fit.joints[0][2]["residual"] is None
    assert fit.to_json(["a", "b"])["frames"][1]["id"] == "b"
    # The tip moves rigidly with bone1: its local rotation is the rest one, its skinning matrix bone1's.
    np.testing.assert_allclose(np.abs(fit.poses[:, 3, 0]), 1.0, atol=1e-9)
    matrices = joint_matrices(rig, torch.from_numpy(fit.poses)).numpy()
    np.testing.assert_allclose(matrices[:, 2], matrices[:, 1], atol=1e-9)


def test_frames_of_different_sizes_are_one_clear_line(tmp_path):
    rig = tube_mesh("tube")
    save_skinned_mesh(rig, tmp_path / "tube.glb")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 48)).save(images / "a.png")
    Image.new("RGB", (64, 64)).save(images / "b.png")
    write_predictions(tmp_path / "preds", rig, known_poses(rig, 2), ids=["a", "b"], attrs={"images": str(images)})
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path))
    assert code == 1 and "frames of different sizes: a is 64x48, b is 64x64" in one_line_error(output)


def test_an_empty_predictions_folder_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    save_skinned_mesh(tube_mesh("tube"), tmp_path / "tube.glb")
    code, output = animate("--pred", tmp_path / "empty", "--out", tmp_path / "anim", "--rig", tmp_path / "tube.glb")
    assert code == 1 and "no predictions.zarr here" in one_line_error(output)
    from dualpm.predictions import PredictionsWriter

    store = PredictionsWriter(tmp_path / "none" / "predictions.zarr", 1, (8, 8))
    store.finish({})
    code, output = animate("--pred", tmp_path / "none", "--out", tmp_path / "anim", "--rig", tmp_path / "tube.glb")
    assert code == 1 and "the predictions hold no frames" in one_line_error(output)


def test_frames_without_points_are_interpolated_and_all_empty_is_one_clear_line(tmp_path):
    from scipy.spatial.transform import Rotation, Slerp

    rig = tube_mesh("tube")
    save_skinned_mesh(rig, tmp_path / "tube.glb")
    rig = load_skinned_mesh(tmp_path / "tube.glb")
    write_predictions(tmp_path / "preds", rig, known_poses(rig, 5, seed=3, max_angle=0.5), unseen=(2, 4))
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path))
    assert code == 0, output
    assert "2 of 5 frames have fewer than 3 kept points" in output
    report = json.loads((tmp_path / "anim" / "fit.json").read_text())
    assert [f.get("status") for f in report["frames"]] == [None, None, "no kept points: interpolated", None,
                                                           "no kept points: interpolated"]
    keys, _, _ = read_glb_animation(tmp_path / "anim" / "animation.glb", rig.num_nodes)
    quat = lambda wxyz: Rotation.from_quat(np.roll(wxyz, -1, axis=-1))  # noqa: E731
    for node in rig.joint_nodes:
        halfway = Slerp([1, 3], quat(keys[[1, 3], node, :4]))([2])
        assert (halfway.inv() * quat(keys[2, node, :4])).magnitude().max() < 1e-5  # geodesic midpoint
        assert (quat(keys[3, node, :4]).inv() * quat(keys[4, node, :4])).magnitude().max() < 1e-5  # end held
    np.testing.assert_allclose(keys[2, :, 4:], (keys[1, :, 4:] + keys[3, :, 4:]) / 2, atol=1e-5)
    depth = report["camera"]["view_z"]
    assert depth[2] == pytest.approx((depth[1] + depth[3]) / 2) and depth[4] == pytest.approx(depth[3])

    write_predictions(tmp_path / "dark", rig, known_poses(rig, 2), unseen=(0, 1))
    code, output = animate("--pred", tmp_path / "dark", "--out", tmp_path / "anim2", *unsmoothed(tmp_path))
    assert code == 1 and "no frame has 3 or more kept points" in one_line_error(output)


def test_without_a_rig_or_a_recorded_dataset_the_command_asks_for_one(oracle_sequence):
    tmp_path = oracle_sequence[0]
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim")
    assert code == 1 and "pass --rig RIG.glb" in one_line_error(output)


def test_smoothing_retargeting_and_the_lbs_fit_call_the_skeleton_package(oracle_sequence):
    tmp_path, rig, poses, views, _ = oracle_sequence
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "lbs", "--rig", tmp_path / "tube.glb",
                           "--fit", "lbs")
    assert code == 0, output
    report = json.loads((tmp_path / "lbs" / "fit.json").read_text())
    assert report["method"] == "lbs" and {j["status"] for f in report["frames"] for j in f["joints"]} <= {
        "fitted", "inherited", "interpolated", "rest"}
    validate_glb(tmp_path / "lbs" / "animation.glb")
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", "--rig", tmp_path / "tube.glb",
                           "--smooth", "savgol")
    assert code == 0, output
    jitter = json.loads((tmp_path / "anim" / "fit.json").read_text())["jitter"]
    assert jitter["method"] == "savgol" and jitter["after"] <= jitter["before"]
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "re", *unsmoothed(tmp_path),
                           "--target-rig", tmp_path / "tube.glb")
    assert code == 0, output
    validate_glb(tmp_path / "re" / "animation.glb")


@pytest.mark.parametrize("path", ["animation.glb"])
def test_an_earlier_run_is_not_overwritten_silently(oracle_sequence, path):
    tmp_path = oracle_sequence[0]
    (tmp_path / "anim").mkdir()
    (tmp_path / "anim" / path).write_bytes(b"")
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path))
    assert code == 1 and "--overwrite" in one_line_error(output)
    (tmp_path / "anim" / "poses").mkdir()
    (tmp_path / "anim" / "poses" / "old_pose.npz").write_bytes(b"")  # a frame of the earlier run
    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "anim", *unsmoothed(tmp_path),
                           "--overwrite")
    assert code == 0, output
    assert {p.name for p in (tmp_path / "anim" / "poses").iterdir()} == {
        f"frame{i}_pose.npz" for i in (1, 2, 3, 4, 10)}
    validate_glb(tmp_path / "anim" / "animation.glb")


def test_glb_document_is_readable_by_pygltflib_as_a_whole(tmp_path):
    save_skinned_mesh(tube_mesh("tube"), tmp_path / "tube.gltf")
    rig = load_skinned_mesh(tmp_path / "tube.gltf")
    export_glb(tmp_path / "tube.gltf", tmp_path / "a.glb", known_poses(rig, 3), fps=24)
    doc = pygltflib.GLTF2().load(str(tmp_path / "a.glb"))
    assert len(doc.buffers) == 1 and doc.buffers[0].uri is None and not doc.cameras
    validate_glb(tmp_path / "a.glb")


def test_the_template_its_scale_and_focal_lengths_are_found_through_the_dataset(tmp_path):
    from datagen import make_source_dataset
    from dualpm.data.source import read_metadata
    from dualpm.store.manifest import Manifest, plan_shards, save_manifest

    ds = make_source_dataset(tmp_path / "src", num_samples=3, rgb=False, masks=False)
    model = ds.model_of[ds.ids[0]]
    template_path = ds.root / "shapes" / model / f"{model}_shape.gltf"
    template = load_skinned_mesh(template_path)
    save_skinned_mesh(scaled_mesh(template, 0.5), tmp_path / "original.glb")  # the user's rig, before synth
    (ds.root / "synth.json").write_text(json.dumps({"mesh_scales": {model: 2.0}}))
    save_manifest(tmp_path / "prep", Manifest.create(str(ds.root), 4, plan_shards({"train": ds.ids}, 4)))
    poses = known_poses(template, 3, seed=5)
    write_predictions(tmp_path / "preds", template, poses, ids=ds.ids, attrs={"data": str(tmp_path / "prep")})

    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "a")
    assert code == 0, output
    config = (tmp_path / "a" / "animate.config.yaml").read_text()
    assert f"rig: {template_path}" in config and "mesh_scale: 1.0" in config
    camera = json.loads((tmp_path / "a" / "fit.json").read_text())["camera"]
    assert camera["focal_source"] == "the dataset's metadata of the frames"
    assert camera["focal_length_mm"] == [read_metadata(ds.root / "metadata" / f"{i}_metadata.txt").focal_length
                                         for i in ds.ids]

    code, output = animate("--pred", tmp_path / "preds", "--out", tmp_path / "b", "--rig", tmp_path / "original.glb")
    assert code == 0, output
    validate_glb(tmp_path / "b" / "animation.glb")
    exported = load_skinned_mesh(tmp_path / "b" / "animation.glb")
    back, _, _ = read_glb_animation(tmp_path / "b" / "animation.glb", exported.num_nodes)
    in_rig_units = skin(exported, back, dtype=torch.float64).numpy()  # the user's units: half the model's
    fitted = np.stack([read_pose_file(tmp_path / "b" / "poses" / f"{i}_pose.npz") for i in ds.ids])
    in_model_units = skin(template, fitted, dtype=torch.float64).numpy()
    np.testing.assert_allclose(2.0 * in_rig_units, in_model_units, atol=1e-5 * body_size(template))
