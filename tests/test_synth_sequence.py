"""`dualpm-prep synth --sequence LEN`: ordered frames of smooth motion that the reader and renderer take
unchanged; the key-pose source passes through its keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy.spatial.transform import Rotation

from dualpm.camera import projection_from_focal, view_from_camera_pose
from dualpm.data.source import SourceDataset
from dualpm.gltf import load_skinned_mesh
from dualpm.render import render_dual_pointmaps
from dualpm.skinning import read_pose_file, skin
from pipeline.cli import main
from pipeline.synth.poses import PoseSampler
from pipeline.synth.quadruped import make_quadruped
from pipeline.synth.sequence import KEY_FRAMES, ORBIT_DEG_PER_FRAME, key_pose_source


def angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra, rb = (Rotation.from_quat(np.roll(q, -1, axis=-1).reshape(-1, 4)) for q in (a, b))
    return np.degrees((ra.inv() * rb).magnitude()).reshape(a.shape[:-1])


@pytest.fixture(scope="module")
def sequence_set(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("seq") / "data"
    args = ["synth", str(out), "--num-samples", "10", "--num-models", "1", "--sequence", "5", "--image-size", "64",
            "--faces", "2000", "--val-fraction", "0.5", "--workers", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return out


def test_sequence_frames_are_ordered_smooth_and_held_out_whole(sequence_set):
    ds = SourceDataset(sequence_set)
    assert ds.ids == [f"{i:06d}" for i in range(1, 11)]
    assert json.loads((sequence_set / "synth.json").read_text())["config"]["sequence"] == 5
    val = (sequence_set / "splits" / "val.txt").read_text().split()
    assert val in ([f"{i:06d}" for i in range(1, 6)], [f"{i:06d}" for i in range(6, 11)])
    mesh = load_skinned_mesh(ds.layout.mesh("quadruped_000"))
    poses = np.stack([read_pose_file(ds.sample(i).pose_path, mesh.num_nodes) for i in ds.ids]).astype(np.float64)
    views = np.stack([view_from_camera_pose(torch.from_numpy(ds.sample(i).camera_pose)).numpy() for i in ds.ids])
    for first in (0, 5):
        frames = slice(first, first + 5)
        steps = angle_deg(poses[frames][1:, :, :4], poses[frames][:-1, :, :4])
        assert steps.max() < 12.0  # key poses 8 frames apart, limits of tens of degrees
        turns = Rotation.from_matrix(views[frames][1:, :3, :3] @ views[frames][:-1, :3, :3].transpose(0, 2, 1))
        assert np.degrees(turns.magnitude()).max() <= ORBIT_DEG_PER_FRAME + 1e-6
        focal = {ds.sample(i).focal_length for i in ds.ids[frames]}
        assert len(focal) == 1


def test_sequence_frames_render_to_their_masks(sequence_set):
    ds = SourceDataset(sequence_set)
    mesh = load_skinned_mesh(ds.layout.mesh("quadruped_000"))
    for sample_id in ds.ids[:5]:
        sample = ds.sample(sample_id)
        posed = skin(mesh, read_pose_file(sample.pose_path, mesh.num_nodes))
        view = view_from_camera_pose(torch.from_numpy(sample.camera_pose))[None]
        projection = projection_from_focal(torch.tensor([sample.focal_length], dtype=torch.float64))
        maps = render_dual_pointmaps(torch.tensor(mesh.vertices), posed, torch.tensor(mesh.faces), view, projection,
                                     64, 1, backend="cpu", workers=1)
        mask = np.asarray(Image.open(sample.mask_path))
        np.testing.assert_array_equal(mask, maps[0, :, :, 0, 6].numpy() > 0)
        assert mask.mean() > 0.02


def test_key_pose_source_passes_through_its_keys():
    mesh = make_quadruped("q", np.random.default_rng(0), 2000)
    sampler = PoseSampler.for_mesh(mesh, yaw=False, forward=np.array([0.0, 0.0, 1.0]))
    poses = key_pose_source(mesh, sampler, np.random.default_rng(5), 2 * KEY_FRAMES + 1)
    keys = [sampler.sample(rng) for rng in [np.random.default_rng(5)] for _ in range(3)]
    assert poses.shape == (2 * KEY_FRAMES + 1, mesh.num_nodes, 7)
    for k, key in enumerate(keys):
        assert angle_deg(poses[k * KEY_FRAMES, :, :4], key[:, :4]).max() < 1e-6
    np.testing.assert_allclose(poses[:, :, 4:], np.broadcast_to(keys[0][:, 4:], poses[:, :, 4:].shape))
    again = key_pose_source(mesh, sampler, np.random.default_rng(5), 2 * KEY_FRAMES + 1)
    np.testing.assert_array_equal(poses, again)


def test_a_rig_with_clips_plays_its_own_clip_in_a_sequence(tmp_path, ray_local):
    """--poses clips: each sequence plays the rig's LINEAR clip "Bend" (bone1 0 -> 40 degrees about z over
    one second) at 24 frames a second, wrapping at the clip's end: consecutive frames turn 40/24 degrees."""
    from tests.rigs import textured_tube

    rig = textured_tube(tmp_path / "rig" / "tube.gltf")
    out = tmp_path / "data"
    args = ["synth", str(out), "--mesh", str(rig), "--num-samples", "12", "--sequence", "6", "--poses", "clips",
            "--image-size", "48", "--val-fraction", "0", "--workers", "1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    source = SourceDataset(out)
    mesh = load_skinned_mesh(next((out / "shapes").rglob("*_shape.gltf")))
    poses = np.stack([read_pose_file(source.sample(i).pose_path, mesh.num_nodes) for i in source.ids])
    turn = Rotation.from_quat(np.roll(poses[:, 2, :4], -1, axis=-1))  # node 2 = bone1, relative to rest (identity)
    rotvec = turn.as_rotvec()
    np.testing.assert_allclose(rotvec[:, :2], 0.0, atol=1e-9)  # about z only
    angles = np.degrees(rotvec[:, 2])
    assert ((angles >= -1e-6) & (angles <= 40 + 1e-6)).all()
    for sequence in angles.reshape(2, 6):
        steps = np.diff(sequence)
        wrapped = steps < 0  # the clip's end: back by 40 degrees minus a step
        np.testing.assert_allclose(steps[~wrapped], 40 / 24, atol=1e-6)
        np.testing.assert_allclose(steps[wrapped], 40 / 24 - 40, atol=1e-6)
        assert wrapped.sum() <= 1
