"""Pose files, forward kinematics and linear-blend skinning, checked against analytic answers and
an independent NumPy/SciPy implementation written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from dualpm.errors import DatasetError
from dualpm.gltf import SkinnedMesh
from dualpm.skinning import (
    global_matrices,
    joint_matrices,
    local_matrices,
    read_pose_file,
    rest_pose,
    skin,
    write_pose_file,
)


# ---- independent reference ----------------------------------------------------------------------


def ref_local(translation, quat_wxyz, scale) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = Rotation.from_quat(quat_wxyz, scalar_first=True).as_matrix() @ np.diag(scale)
    m[:3, 3] = translation
    return m


def ref_globals(mesh: SkinnedMesh, pose: np.ndarray) -> np.ndarray:
    """Recursive forward kinematics for one (N, 7) pose, float64."""
    pose = pose.astype(np.float64)
    local = [ref_local(p[4:], p[:4], s) for p, s in zip(pose, mesh.rest_scale, strict=True)]
    out = {}

    def world(i):
        if i not in out:
            parent = mesh.parents[i]
            out[i] = local[i] if parent < 0 else world(parent) @ local[i]
        return out[i]

    return np.stack([world(i) for i in range(mesh.num_nodes)])


def ref_skin(mesh: SkinnedMesh, pose: np.ndarray) -> np.ndarray:
    """(V, 3) skinned vertices for one pose: plain loops over influence slots."""
    g = ref_globals(mesh, pose)
    mats = g[mesh.joint_nodes] @ mesh.inverse_bind.astype(np.float64)
    homogeneous = np.concatenate([mesh.vertices, np.ones((mesh.num_vertices, 1))], axis=1)
    out = np.zeros((mesh.num_vertices, 3))
    for k in range(mesh.joints.shape[1]):
        per_vertex = mats[mesh.joints[:, k]]  # (V, 4, 4)
        out += mesh.weights[:, k, None] * np.einsum("vij,vj->vi", per_vertex, homogeneous)[:, :3]
    return out


# ---- meshes -------------------------------------------------------------------------------------


def bar_mesh(mesh_node_translation=(5.0, 5.0, 5.0)) -> SkinnedMesh:
    """Bar along x from 0 to 2 (y in {0, 0.2}); bone0 at the origin, bone1 at x = 1.

    Nodes (children before parents on purpose): 0 mesh node, 1 bone1 (child of 2), 2 bone0.
    Inverse bind matrices are the inverses of the rest globals, so the rest pose is the bind pose.
    """
    vertices = np.array([[0.5 * i, 0.2 * r, 0.0] for i in range(5) for r in range(2)])
    faces = np.array([[[2 * q, 2 * q + 2, 2 * q + 3], [2 * q, 2 * q + 3, 2 * q + 1]] for q in range(4)])
    faces = faces.reshape(-1, 3)  # (4 quads, 2, 3) -> (8, 3)
    weights = np.zeros((10, 4))
    weights[:4, 0] = 1  # x < 1: bone0
    weights[4:6, :2] = 0.5  # x == 1: shared
    weights[6:, 1] = 1  # x > 1: bone1
    joints = np.tile([0, 1, 0, 0], (10, 1))
    ibm = np.stack([np.eye(4), np.eye(4)])
    ibm[1, 0, 3] = -1.0  # inverse of translate(1, 0, 0)
    return SkinnedMesh(
        name="bar", vertices=vertices, faces=faces, joints=joints, weights=weights, joint_nodes=[2, 1],
        inverse_bind=ibm, node_names=("bar", "bone1", "bone0"), parents=[-1, 2, -1],
        rest_translation=[mesh_node_translation, [1, 0, 0], [0, 0, 0]],
        rest_rotation=np.tile([1.0, 0, 0, 0], (3, 1)), rest_scale=np.ones((3, 3)), mesh_node=0,
    )


def random_mesh(seed=0, v=40, k=8) -> SkinnedMesh:
    """A 6-node tree with non-unit scales, K=8 influences, random IBMs (not the rest inverses)."""
    rng = np.random.default_rng(seed)
    parents = np.array([-1, 4, -1, 1, 2, 2])  # 0 mesh node; 2 -> {4, 5}; 4 -> 1 -> 3
    joint_nodes = np.array([2, 4, 1, 3, 5])
    weights = rng.random((v, k)) * (rng.random((v, k)) > 0.3)
    weights[:, 0] += 0.1
    weights /= weights.sum(1, keepdims=True)
    ibm = np.tile(np.eye(4), (5, 1, 1))
    ibm[:, :3, :] = rng.normal(size=(5, 3, 4))
    return SkinnedMesh(
        name="random", vertices=rng.normal(size=(v, 3)), faces=rng.integers(0, v, (10, 3)),
        joints=rng.integers(0, 5, (v, k)), weights=weights, joint_nodes=joint_nodes, inverse_bind=ibm,
        node_names=tuple(f"n{i}" for i in range(6)), parents=parents,
        rest_translation=rng.normal(size=(6, 3)),
        rest_rotation=Rotation.random(6, random_state=seed).as_quat(scalar_first=True),
        rest_scale=rng.uniform(0.5, 2.0, (6, 3)), mesh_node=0,
    )


def random_poses(mesh: SkinnedMesh, batch: int, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    quats = Rotation.random(batch * mesh.num_nodes, random_state=seed).as_quat(scalar_first=True)
    quats *= rng.uniform(0.5, 2.0, (len(quats), 1))  # not unit length: must be normalised
    translations = rng.normal(size=(batch * mesh.num_nodes, 3))
    return np.concatenate([quats, translations], 1).reshape(batch, mesh.num_nodes, 7).astype(np.float32)


# ---- skinning -----------------------------------------------------------------------------------


def test_skin_matches_reference():
    mesh = random_mesh()
    poses = random_poses(mesh, 3)
    got = skin(mesh, poses, dtype=torch.float64)
    assert got.shape == (3, mesh.num_vertices, 3) and got.dtype == torch.float64
    for b in range(3):
        np.testing.assert_allclose(got[b].numpy(), ref_skin(mesh, poses[b]), rtol=0, atol=1e-10)
        np.testing.assert_allclose(global_matrices(mesh, torch.from_numpy(poses[b]).double())[0].numpy(),
                                   ref_globals(mesh, poses[b]), rtol=0, atol=1e-12)
    single = skin(mesh, poses[0])  # float32 default, (N, 7) input -> batch of one
    assert single.shape == (1, mesh.num_vertices, 3) and single.dtype == torch.float32
    np.testing.assert_allclose(single[0].numpy(), ref_skin(mesh, poses[0]), rtol=0, atol=1e-4)


def test_local_and_joint_matrices_match_reference():
    mesh = random_mesh(seed=3)
    pose = random_poses(mesh, 1, seed=4)
    local = local_matrices(mesh, torch.from_numpy(pose).double())
    rows = pose[0].astype(np.float64)
    expected = [ref_local(p[4:], p[:4], s) for p, s in zip(rows, mesh.rest_scale, strict=True)]
    np.testing.assert_allclose(local[0].numpy(), np.stack(expected), rtol=0, atol=1e-12)
    joint = joint_matrices(mesh, torch.from_numpy(pose).double())
    assert joint.shape == (1, mesh.num_joints, 4, 4)
    ref = ref_globals(mesh, pose[0])[mesh.joint_nodes] @ mesh.inverse_bind.astype(np.float64)
    np.testing.assert_allclose(joint[0].numpy(), ref, rtol=0, atol=1e-12)


def test_rest_pose_reproduces_bind_vertices():
    mesh = random_mesh(seed=5)
    # Make the inverse bind matrices match the rest globals, as an exporter does.
    rest_globals = ref_globals(mesh, rest_pose(mesh))
    mesh = SkinnedMesh(**{**mesh.__dict__, "inverse_bind": np.linalg.inv(rest_globals[mesh.joint_nodes])})
    got = skin(mesh, rest_pose(mesh), dtype=torch.float64)[0].numpy()  # float32 storage, float64 maths
    np.testing.assert_allclose(got, mesh.vertices, rtol=0, atol=1e-6)
    bar = bar_mesh()
    np.testing.assert_allclose(skin(bar, rest_pose(bar))[0].numpy(), bar.vertices, rtol=0, atol=1e-6)


def test_rest_pose_layout():
    mesh = random_mesh()
    pose = rest_pose(mesh)
    assert pose.shape == (mesh.num_nodes, 7) and pose.dtype == np.float32
    np.testing.assert_array_equal(pose[:, :4], mesh.rest_rotation)
    np.testing.assert_array_equal(pose[:, 4:], mesh.rest_translation)


def test_rotating_one_joint_90_degrees():
    mesh = bar_mesh()
    pose = rest_pose(mesh)
    pose[1, :4] = [math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)]  # bone1: +90 deg about z
    got = skin(mesh, pose, dtype=torch.float64)[0].numpy()
    # bone1 vertices (x, y) -> pivot (1, 0) + rot90(x - 1, y) = (1 - y, x - 1).
    x, y = mesh.vertices[:, 0].astype(np.float64), mesh.vertices[:, 1].astype(np.float64)
    expected = mesh.vertices.astype(np.float64).copy()
    expected[6:, 0], expected[6:, 1] = 1 - y[6:], x[6:] - 1
    # Shared vertices at x = 1: half of (1, y) and half of (1 - y, 0).
    expected[4:6, 0], expected[4:6, 1] = 1 - y[4:6] / 2, y[4:6] / 2
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[:4], mesh.vertices[:4])  # bone0 vertices did not move


def test_mesh_node_transform_is_ignored():
    a, b = bar_mesh((0, 0, 0)), bar_mesh((3, -2, 7))
    pose_a, pose_b = rest_pose(a), rest_pose(b)
    pose_a[1, :4] = pose_b[1, :4] = [0.8, 0, 0.6, 0]
    pose_b[0] = [0, 1, 0, 0, 9, 9, 9]  # even a posed mesh node has no effect
    torch.testing.assert_close(skin(a, pose_a), skin(b, pose_b), rtol=0, atol=0)


def test_batch_equals_single_calls_and_input_types():
    mesh = random_mesh(seed=7)
    poses = random_poses(mesh, 5, seed=8)
    batch = skin(mesh, torch.from_numpy(poses))
    for b in range(5):
        torch.testing.assert_close(batch[b], skin(mesh, poses[b])[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(batch, skin(mesh, poses), rtol=0, atol=0)  # NumPy == tensor input


def test_skin_is_differentiable():
    mesh = random_mesh(seed=9, v=6, k=4)
    poses = torch.from_numpy(random_poses(mesh, 2, seed=10)).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: skin(mesh, p, dtype=torch.float64), (poses,))


def test_wrong_node_count_is_refused():
    mesh = bar_mesh()
    with pytest.raises(DatasetError, match="3 nodes"):
        skin(mesh, np.zeros((2, 4, 7)))


# ---- pose files ---------------------------------------------------------------------------------


def test_pose_file_round_trip(tmp_path):
    poses = random_poses(random_mesh(), 1)[0]
    path = tmp_path / "poses" / "000001_pose.npz"
    write_pose_file(path, poses)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporaries left
    got = read_pose_file(path, num_nodes=len(poses))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, poses)
    np.testing.assert_array_equal(read_pose_file(path), poses)


def test_pose_file_float64_is_accepted(tmp_path):
    poses = np.tile([1.0, 0, 0, 0, 0.1, 0.2, 0.3], (3, 1))
    np.savez(tmp_path / "p.npz", poses=poses)
    np.testing.assert_array_equal(read_pose_file(tmp_path / "p.npz"), poses.astype(np.float32))


GOOD = np.tile(np.array([1.0, 0, 0, 0, 0, 0, 0], dtype=np.float32), (3, 1))


@pytest.mark.parametrize(
    "arrays,num_nodes,phrase",
    [
        ({"pose": GOOD}, None, "no key 'poses'"),
        ({"poses": GOOD[:, :6]}, None, r"\(num_nodes, 7\)"),
        ({"poses": GOOD[None]}, None, r"\(num_nodes, 7\)"),
        ({"poses": GOOD}, 4, "3 nodes but the mesh has 4"),
        ({"poses": np.where(np.arange(7) == 5, np.nan, GOOD)}, None, "NaN"),
        ({"poses": np.where(np.arange(7) == 6, np.inf, GOOD)}, None, "infinite"),
        ({"poses": np.concatenate([GOOD[:2], [[0, 0, 0, 0, 1, 2, 3]]])}, None, "node 2 has a zero quatern"),
        ({"poses": np.array([[None] * 7], dtype=object)}, None, "cannot read"),
    ],
)
def test_bad_pose_files(tmp_path, arrays, num_nodes, phrase):
    path = tmp_path / "bad_pose.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=phrase) as info:
        read_pose_file(path, num_nodes=num_nodes)
    assert "bad_pose.npz" in str(info.value)


@pytest.mark.parametrize("content,phrase", [(None, "not found"), (b"not a zip", "cannot read")])
def test_unreadable_pose_files(tmp_path, content, phrase):
    path = tmp_path / "x_pose.npz"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=phrase):
        read_pose_file(path)


def test_npy_instead_of_npz(tmp_path):
    path = tmp_path / "x_pose.npz"
    with open(path, "wb") as fh:
        np.save(fh, GOOD)
    with pytest.raises(DatasetError, match="not an .npz"):
        read_pose_file(path)


def test_write_refuses_bad_poses(tmp_path):
    with pytest.raises(DatasetError, match="shape"):
        write_pose_file(tmp_path / "p.npz", np.zeros((3, 6)))
    with pytest.raises(DatasetError, match="zero quaternion"):
        write_pose_file(tmp_path / "p.npz", np.zeros((3, 7)))
    assert list(tmp_path.iterdir()) == []
