"""Skeleton fitting: skin-weight lookup, per-joint Kabsch-Umeyama fits, reposing, errors, JSON."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from dualpm import skinning
from dualpm.skeleton.joints import (
    bind_positions,
    dense_skin_weights,
    estimate_joint_transforms,
    joint_errors,
    joint_parents,
    repose_vertices,
    save_skeleton_json,
    load_skeleton_json,
    skin_weights_at,
)
from dualpm.skeleton.rigid import SkeletonError
from dualpm.gltf import SkinnedMesh


def make_mesh(
    vertices, joints, weights, joint_nodes, parents, inverse_bind=None, translation=None
) -> SkinnedMesh:
    """A SkinnedMesh built in code: one triangle, identity rest rotations, unit scales."""
    n, j = len(parents), len(joint_nodes)
    return SkinnedMesh(
        name="test", vertices=vertices, faces=np.array([[0, 1, 2]]), joints=joints, weights=weights,
        joint_nodes=joint_nodes,
        inverse_bind=np.stack([np.eye(4)] * j) if inverse_bind is None else inverse_bind,
        node_names=tuple(f"node{i}" for i in range(n)), parents=parents,
        rest_translation=np.zeros((n, 3)) if translation is None else translation,
        rest_rotation=np.tile([1.0, 0, 0, 0], (n, 1)), rest_scale=np.ones((n, 3)), mesh_node=n - 1,
    )


def rigid(axis, degrees: float, translation) -> np.ndarray:
    matrix = np.eye(4)
    axis = np.asarray(axis, dtype=np.float64)
    matrix[:3, :3] = Rotation.from_rotvec(np.radians(degrees) * axis / np.linalg.norm(axis)).as_matrix()
    matrix[:3, 3] = translation
    return matrix


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:3, :3].T + matrix[:3, 3]


def limb_cloud(rng: np.random.Generator, per_joint: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Three limb segments along x ([0,1], [1,2], [2,3]) with thickness; one-hot joint per point."""
    joint = np.repeat(np.arange(3), per_joint)
    points = np.stack(
        [
            joint + rng.uniform(0, 1, joint.size),
            rng.normal(0, 0.1, joint.size),
            rng.normal(0, 0.15, joint.size),
        ],
        axis=1,
    )
    return points, joint


TRUE_TRANSFORMS = np.stack(
    [
        rigid([0, 1, 0], 10, [0.1, 0.0, 0.2]),
        rigid([0, 0, 1], 35, [0.0, 0.3, 0.0]),
        rigid([1, 1, 0], -40, [0.5, -0.2, 0.1]),
    ]
)


def pose(canonical: np.ndarray, joint: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    # Reference LBS for one-hot weights: each point moves rigidly with its joint.
    return np.einsum("pab,pb->pa", transforms[joint, :3, :3], canonical) + transforms[joint, :3, 3]


def test_exact_recovery_from_rigidly_weighted_points():
    rng = np.random.default_rng(0)
    canonical, joint = limb_cloud(rng)
    posed = pose(canonical, joint, TRUE_TRANSFORMS)
    weights = np.eye(3, dtype=np.float32)[joint]  # (P, J)
    fit = estimate_joint_transforms(canonical, posed, weights)
    assert fit.valid.all()
    np.testing.assert_array_equal(fit.source, [0, 1, 2])
    np.testing.assert_allclose(fit.transforms, TRUE_TRANSFORMS, atol=1e-6, rtol=0)
    assert (fit.residual < 1e-6).all()
    rotation_deg, translation = joint_errors(fit.transforms, TRUE_TRANSFORMS)
    assert rotation_deg.max() < 1e-4 and translation.max() < 1e-6


def test_recovery_far_from_the_origin_and_with_scale():
    rng = np.random.default_rng(1)
    canonical, joint = limb_cloud(rng)
    canonical = canonical + 1000.0  # moments are centred first, so precision survives
    truth = TRUE_TRANSFORMS.copy()
    truth[:, :3, 3] += 500.0
    fit = estimate_joint_transforms(canonical, pose(canonical, joint, truth), np.eye(3)[joint])
    np.testing.assert_allclose(fit.transforms, truth, atol=1e-6, rtol=0)
    scaled = truth.copy()
    scaled[1, :3, :3] *= 1.3
    posed = pose(canonical, joint, scaled)
    fit = estimate_joint_transforms(canonical, posed, np.eye(3)[joint], with_scale=True)
    np.testing.assert_allclose(fit.transforms, scaled, atol=1e-6, rtol=0)


def test_noise_error_grows_smoothly_and_stays_bounded():
    rng = np.random.default_rng(2)
    canonical, joint = limb_cloud(rng)
    clean = pose(canonical, joint, TRUE_TRANSFORMS)
    weights = np.eye(3)[joint]
    size = np.ptp(canonical, axis=0).max()  # 3 scene units
    worst = []
    for level in (0.0, 0.001, 0.003, 0.01):
        errors = []
        for _ in range(4):
            posed = clean + rng.normal(scale=level * size, size=clean.shape)
            fit = estimate_joint_transforms(canonical, posed, weights)
            errors.append(joint_errors(fit.transforms, TRUE_TRANSFORMS)[0].max())
        worst.append(max(errors))
    assert worst[0] < 1e-4
    assert worst[0] < worst[1] < worst[2] < worst[3]
    assert worst[3] < 3.0  # degrees at noise 1 % of the object size


def test_unsupported_joints_fall_back_to_ancestor_or_global_fit():
    rng = np.random.default_rng(3)
    canonical, joint = limb_cloud(rng)
    keep = np.r_[np.flatnonzero(joint < 2), np.flatnonzero(joint == 2)[:2]]  # joint 2: two points only
    canonical, joint = canonical[keep], joint[keep]
    posed = pose(canonical, joint, TRUE_TRANSFORMS)
    weights = np.eye(3)[joint]
    fit = estimate_joint_transforms(canonical, posed, weights, parents=np.array([-1, 0, 1]))
    np.testing.assert_array_equal(fit.valid, [True, True, False])
    np.testing.assert_array_equal(fit.source, [0, 1, 1])
    np.testing.assert_array_equal(fit.transforms[2], fit.transforms[1])
    assert np.isnan(fit.residual[2])
    orphan = estimate_joint_transforms(canonical, posed, weights)  # no parents: the global fit
    np.testing.assert_array_equal(orphan.source, [0, 1, -1])
    from dualpm.eval import kabsch_umeyama

    r, t, _ = kabsch_umeyama(canonical, posed)
    np.testing.assert_allclose(orphan.transforms[2, :3, :3], r, atol=1e-12, rtol=0)
    np.testing.assert_allclose(orphan.transforms[2, :3, 3], t, atol=1e-12, rtol=0)


def test_weight_threshold_and_collinear_support():
    rng = np.random.default_rng(4)
    canonical, joint = limb_cloud(rng)
    posed = pose(canonical, joint, TRUE_TRANSFORMS)
    weights = np.eye(3)[joint] * 0.9
    weights[joint == 0, 1] = 0.1  # below min_weight: joint 1 must ignore joint 0's points
    fit = estimate_joint_transforms(canonical, posed, weights)
    np.testing.assert_allclose(fit.transforms, TRUE_TRANSFORMS, atol=1e-6, rtol=0)
    line = canonical.copy()
    line[joint == 2, 1:] = 0.0  # joint 2's points on a line: rotation about it is undetermined
    fit = estimate_joint_transforms(line, pose(line, joint, TRUE_TRANSFORMS), weights)
    np.testing.assert_array_equal(fit.valid, [True, True, False])
    with pytest.raises(SkeletonError, match="min_points >= 3"):
        estimate_joint_transforms(canonical, posed, weights, min_points=2)
    with pytest.raises(SkeletonError, match="weights"):
        estimate_joint_transforms(canonical, posed, weights[:-1])


def test_skin_weights_nearest_blend_and_outliers():
    template = make_mesh(
        vertices=np.array([[0.0, 0, 0], [1.0, 0, 0], [5.0, 0, 0]]),
        joints=np.array([[0, 1], [1, 1], [2, 0]]),
        weights=np.array([[0.75, 0.25], [0.5, 0.5], [1.0, 0.0]]),
        joint_nodes=np.array([0, 1, 2]),
        parents=np.array([-1, 0, 1, -1]),
    )
    dense = dense_skin_weights(template.joints, template.weights, 3)
    np.testing.assert_array_equal(dense, [[0.75, 0.25, 0], [0, 1.0, 0], [0, 0, 1.0]])  # repeats add up
    points = np.array([[0.0, 0, 0], [0.9, 0.1, 0], [0.25, 0, 0], [5.0, 3.0, 0]])
    nearest = skin_weights_at(points, template)
    assert nearest.dtype == np.float32 and nearest.shape == (4, 3)
    np.testing.assert_array_equal(nearest[:3], dense[[0, 1, 0]])
    blended = skin_weights_at(points[2:3], template, k=2)  # distances 0.25, 0.75 -> blend 3:1
    np.testing.assert_allclose(blended[0], 0.75 * dense[0] + 0.25 * dense[1], atol=1e-6, rtol=0)
    clipped = skin_weights_at(points, template, max_distance=1.0)
    np.testing.assert_array_equal(clipped[3], 0.0)
    np.testing.assert_array_equal(clipped[:3], nearest[:3])
    with pytest.raises(SkeletonError, match="joint indices"):
        dense_skin_weights(template.joints, template.weights, 2)


def test_joint_parents_skip_non_joint_nodes():
    # nodes: 0 armature (not a joint) -> 1 joint A -> 2 helper (not a joint) -> 3 joint B; 4 joint C
    # under 0; 5 the mesh node
    template = make_mesh(
        vertices=np.zeros((3, 3)), joints=np.zeros((3, 1)), weights=np.ones((3, 1)),
        joint_nodes=np.array([3, 1, 4]), parents=np.array([-1, 0, 1, 2, 0, -1]),
    )
    np.testing.assert_array_equal(joint_parents(template), [1, -1, -1])


def test_repose_vertices_is_linear_blend_skinning():
    rng = np.random.default_rng(5)
    vertices = rng.normal(size=(6, 3))
    joints = np.array([[0, 1], [1, 2], [2, 0], [0, 0], [1, 1], [2, 1]])
    weights = np.array([[1.0, 0], [0.5, 0.5], [0.3, 0.7], [0.6, 0.4], [1, 0], [0.25, 0.75]])
    out = repose_vertices(vertices, joints, weights, TRUE_TRANSFORMS)
    for v in range(6):  # independent per-vertex reference
        pairs = zip(joints[v], weights[v], strict=True)
        expected = sum(w * apply(TRUE_TRANSFORMS[j], vertices[v]) for j, w in pairs)
        np.testing.assert_allclose(out[v], expected, rtol=0, atol=1e-12)
    with pytest.raises(SkeletonError):
        repose_vertices(vertices, joints + 1, weights, TRUE_TRANSFORMS)


def test_joint_errors_rotation_angle_and_joint_position_distance():
    truth = np.stack([np.eye(4)] * 3)
    estimated = np.stack([rigid([1, 2, 3], 30, [0, 0, 0]), rigid([0, 1, 0], 180, [0, 0, 0]), np.eye(4)])
    estimated[2, :3, 3] = [3.0, 4.0, 0.0]
    rotation_deg, translation = joint_errors(estimated, truth)
    np.testing.assert_allclose(rotation_deg, [30.0, 180.0, 0.0], atol=1e-9, rtol=0)
    np.testing.assert_allclose(translation, [0.0, 0.0, 5.0], atol=1e-12, rtol=0)
    # A rotation about the joint's own position leaves the joint where it was: zero position error,
    # although the translation columns differ.
    joint = np.array([1.0, 2.0, 0.5])
    about = rigid([0, 0, 1], 20, [0, 0, 0])
    about[:3, 3] = joint - about[:3, :3] @ joint
    inverse_bind = np.eye(4)
    inverse_bind[:3, 3] = -joint
    positions = bind_positions(inverse_bind[None])
    np.testing.assert_allclose(positions, [joint], atol=1e-12, rtol=0)
    rotation_deg, translation = joint_errors(about[None], np.eye(4)[None], positions)
    assert rotation_deg[0] == pytest.approx(20.0, abs=1e-9)
    assert translation[0] == pytest.approx(0.0, abs=1e-12)


def test_skeleton_json_round_trip(tmp_path):
    path = tmp_path / "out" / "skeleton.json"
    valid = np.array([True, False, True])
    save_skeleton_json(path, TRUE_TRANSFORMS, valid, ["hip", "knee", "toe"], residual=[0.1, np.nan, 0.0])
    transforms, loaded_valid, names = load_skeleton_json(path)
    np.testing.assert_array_equal(transforms, TRUE_TRANSFORMS)  # JSON floats round-trip exactly
    np.testing.assert_array_equal(loaded_valid, valid)
    assert names == ["hip", "knee", "toe"]
    assert [p.name for p in path.parent.iterdir()] == ["skeleton.json"]  # no temporary left behind
    with pytest.raises(SkeletonError, match="3 joint names"):
        save_skeleton_json(path, TRUE_TRANSFORMS[:2], valid, ["hip", "knee", "toe"])
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(SkeletonError, match="bad.json"):
        load_skeleton_json(tmp_path / "bad.json")


def test_end_to_end_with_skinning_of_a_real_skinned_mesh():
    # A three-joint chain (nodes 0 -> 1 -> 2, one unit apart along x; node 3 holds the mesh), posed by
    # forward kinematics; points skinned rigidly to one joint each. The fit must give back skinning's
    # own joint matrices, and reposing the template with them must give skinning's vertices.
    rng = np.random.default_rng(6)
    vertices, joint = limb_cloud(rng, per_joint=100)
    translation = np.array([[0.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]])
    inverse_bind = np.stack([np.eye(4)] * 3)
    inverse_bind[:, 0, 3] = [0.0, -1.0, -2.0]
    mesh = make_mesh(vertices, joint[:, None], np.ones((len(joint), 1)), np.array([0, 1, 2]),
                     np.array([-1, 0, 1, -1]), inverse_bind, translation)
    np.testing.assert_array_equal(joint_parents(mesh), [-1, 0, 1])
    expected_positions = translation[:3].cumsum(axis=0)  # (0,0,0), (1,0,0), (2,0,0)
    np.testing.assert_allclose(bind_positions(mesh.inverse_bind), expected_positions, atol=1e-12, rtol=0)
    xyzw = Rotation.from_rotvec([[0, 0.3, 0], [0, 0, 0.6], [0.4, 0, -0.5], [0, 0, 0]]).as_quat()
    moved = translation + np.array([[0.2, 0.1, 0.0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])  # root moves
    poses = np.concatenate([xyzw[:, [3, 0, 1, 2]], moved], axis=1)  # (N, 7) [qw, qx, qy, qz, t]
    truth = skinning.joint_matrices(mesh, torch.tensor(poses[None]))[0].numpy()
    posed = skinning.skin(mesh, poses, dtype=torch.float64)[0].numpy()
    weights = skin_weights_at(mesh.vertices, mesh)
    fit = estimate_joint_transforms(mesh.vertices, posed, weights, parents=joint_parents(mesh))
    assert fit.valid.all()
    np.testing.assert_allclose(fit.transforms, truth, atol=1e-6, rtol=0)
    rotation_deg, distance = joint_errors(fit.transforms, truth, bind_positions(mesh.inverse_bind))
    assert rotation_deg.max() < 1e-4 and distance.max() < 1e-6
    reposed = repose_vertices(mesh.vertices, mesh.joints, mesh.weights, fit.transforms)
    np.testing.assert_allclose(reposed, posed, atol=1e-6, rtol=0)
