"""Pose fitting (dualpm.skeleton.fit), smoothing (smooth) and retargeting (retarget) on a procedural
quadruped with known poses: skin a known pose, fit it back, compare with the truth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation, Slerp

from dualpm.skeleton.fit import FrameObservation, fit_sequence
from dualpm.skeleton.kinematics import RigTree
from dualpm.skeleton.retarget import leg_length, retarget_poses
from dualpm.skeleton.rigid import SkeletonError
from dualpm.skeleton.smooth import jitter, smooth_poses
from dualpm.skinning import rest_pose, skin
from pipeline.synth.poses import PoseSampler
from pipeline.synth.quadruped import make_quadruped


@pytest.fixture(scope="module")
def rig():
    return make_quadruped("q", np.random.default_rng(0), 2000)


@pytest.fixture(scope="module")
def sampler(rig):
    return PoseSampler.for_mesh(rig, forward=np.array([0.0, 0.0, 1.0]))


def posed(rig, pose) -> np.ndarray:
    return skin(rig, pose, dtype=torch.float64)[0].numpy()


def observe(rig, pose, rows=None) -> FrameObservation:
    rows = np.arange(rig.num_vertices) if rows is None else rows
    return FrameObservation(rig.vertices[rows].astype(np.float64), posed(rig, pose)[rows], np.ones(len(rows)))


def rotation_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angles between (..., 4) real-first quaternions, degrees (independent of their signs)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ra, rb = (Rotation.from_quat(np.roll(q, -1, axis=-1).reshape(-1, 4)) for q in (a, b))
    return np.degrees((ra.inv() * rb).magnitude()).reshape(a.shape[:-1])


def weighted_joints(rig) -> np.ndarray:
    """(J,) bool: joints that move any vertex (the others are not observable)."""
    used = np.zeros(rig.num_joints, bool)
    used[np.unique(rig.joints[rig.weights > 0])] = True
    return used


def test_lbs_recovers_known_joint_rotations_on_noiseless_points(rig, sampler):
    pose = sampler.sample(np.random.default_rng(1))
    fit = fit_sequence(rig, [observe(rig, pose)], method="lbs")
    size = np.ptp(rig.vertices, axis=0).max()
    assert np.abs(posed(rig, fit.poses[0]) - posed(rig, pose)).max() < 1e-6 * size
    # The joints that move vertices have their transforms recovered (a joint without vertices of its own
    # at its child's origin only fixes the product of the two rotations, so compare world transforms).
    tree = RigTree.of(rig)
    used = weighted_joints(rig)
    fitted, true = (tree.skinning(tree.pose_world(p))[used] for p in (fit.poses[0], pose))
    angle = Rotation.from_matrix(fitted[:, :3, :3] @ true[:, :3, :3].transpose(0, 2, 1)).magnitude()
    assert np.degrees(angle).max() < 1e-6
    assert np.abs(fitted[:, :3, 3] - true[:, :3, 3]).max() < 1e-6 * size
    observable = (tree.below & used[:, None]).any(axis=0)  # joint j moves a vertex through its subtree
    statuses = [r.status for r in fit.joints[0]]
    assert all(s == ("fitted" if ok else "rest") for s, ok in zip(statuses, observable, strict=True))


def test_kabsch_baseline_is_exact_for_rigid_bones(rig, sampler):
    """With one joint per vertex every bone moves rigidly, so the per-bone fit is exact."""
    hard = np.zeros_like(rig.weights)
    hard[:, 0] = 1.0
    joints = rig.joints.copy()
    joints[:, 0] = rig.joints[np.arange(rig.num_vertices), rig.weights.argmax(axis=1)]
    rigid = dataclasses.replace(rig, joints=joints, weights=hard)
    pose = sampler.sample(np.random.default_rng(2))
    fit = fit_sequence(rigid, [observe(rigid, pose)], method="kabsch", min_points=3)
    assert fit.method == "kabsch"
    assert np.abs(posed(rigid, fit.poses[0]) - posed(rigid, pose)).max() < 1e-6
    tree = RigTree.of(rigid)
    counts = np.array([r.points for r in fit.joints[0]])
    fitted, true = (tree.skinning(tree.pose_world(p))[counts >= 3] for p in (fit.poses[0], pose))
    assert np.abs(fitted - true).max() < 1e-6
    assert {r.status for r in fit.joints[0]} <= {"fitted", "inherited"}


def test_lbs_beats_kabsch_with_noise_and_outliers(rig, sampler):
    rng = np.random.default_rng(3)
    pose = sampler.sample(rng)
    truth = posed(rig, pose)
    size = np.ptp(rig.vertices, axis=0).max()
    rows = rng.choice(rig.num_vertices, 1500)
    noisy = truth[rows] + rng.normal(0, 0.005 * size, (len(rows), 3))
    outliers = rng.random(len(rows)) < 0.1
    noisy[outliers] += rng.normal(0, 0.2 * size, (outliers.sum(), 3))
    frame = FrameObservation(rig.vertices[rows], noisy, np.ones(len(rows)))
    errors = {}
    for method in ("kabsch", "lbs"):
        fit = fit_sequence(rig, [frame], method=method)
        errors[method] = np.linalg.norm(posed(rig, fit.poses[0]) - truth, axis=1).mean() / size
    assert errors["lbs"] < 0.002  # 0.2 % of the body size
    assert errors["lbs"] < 0.25 * errors["kabsch"]
    # Confidence weights: the outliers flagged with zero confidence are ignored entirely.
    weighted = FrameObservation(rig.vertices[rows], noisy, (~outliers).astype(np.float64))
    clean = FrameObservation(rig.vertices[rows][~outliers], noisy[~outliers], np.ones((~outliers).sum()))
    a, b = fit_sequence(rig, [weighted]).poses[0], fit_sequence(rig, [clean]).poses[0]
    assert np.abs(posed(rig, a) - posed(rig, b)).max() < 1e-9 * size


def leaf_joint(rig) -> int:
    """A joint with vertices of its own and no joint below it (e.g. a foot or the tail tip)."""
    tree = RigTree.of(rig)
    used = weighted_joints(rig)
    leaves = [j for j in range(rig.num_joints) if tree.below[:, j].sum() == 1 and used[j]]
    return leaves[0]


def test_joint_without_points_keeps_rest_alone_and_is_interpolated_in_a_sequence(rig, sampler):
    joint = leaf_joint(rig)
    node = rig.joint_nodes[joint]
    without = np.flatnonzero(~(rig.joints == joint).any(axis=1))  # every vertex it influences removed
    poses = [sampler.sample(np.random.default_rng(10 + i)) for i in range(3)]
    single = fit_sequence(rig, [observe(rig, poses[1], without)])
    assert single.joints[0][joint].status == "rest" and single.joints[0][joint].points == 0
    assert rotation_error_deg(single.poses[0, node, :4], rest_pose(rig)[node, :4]) < 1e-6
    sequence = fit_sequence(rig, [observe(rig, poses[0]), observe(rig, poses[1], without), observe(rig, poses[2])])
    assert [f[joint].status for f in sequence.joints] == ["fitted", "interpolated", "fitted"]
    ends = Rotation.from_quat(np.roll(sequence.poses[[0, 2], node, :4], -1, axis=1))
    middle = Slerp([0, 2], ends)([1]).as_quat()[0]
    assert rotation_error_deg(sequence.poses[1, node, :4], np.roll(middle, 1)) < 1e-6
    record = sequence.to_json()
    assert record["frames"][1]["joints"][joint] == {"joint": rig.node_names[node], "points": 0,
                                                  "residual": None, "status": "interpolated"}


def test_bad_frames_are_one_line(rig):
    with pytest.raises(SkeletonError, match="frame 0: .*usable point pairs"):
        fit_sequence(rig, [FrameObservation(np.zeros((2, 3)), np.zeros((2, 3)), np.ones(2))])
    with pytest.raises(SkeletonError, match="frame 0: canonical"):
        fit_sequence(rig, [FrameObservation(np.zeros((5, 3)), np.zeros((4, 3)), np.ones(5))])
    with pytest.raises(SkeletonError, match="method"):
        fit_sequence(rig, [], method="icp")


def turning(rig, frames: int, degrees_per_frame: float) -> np.ndarray:
    """Rest pose with the skeleton root yawing at constant angular velocity and moving at constant speed."""
    poses = np.repeat(rest_pose(rig)[None].astype(np.float64), frames, axis=0)
    root = rig.joint_nodes[RigTree.of(rig).skeleton_roots[0]]
    rest = Rotation.from_quat(np.roll(poses[0, root, :4], -1))
    yaw = Rotation.from_rotvec(np.radians(degrees_per_frame) * np.arange(frames)[:, None] * [0.0, 1.0, 0.2])
    poses[:, root, :4] = np.roll((yaw * rest).as_quat(), 1, axis=1)
    poses[:, root, 4:] += np.arange(frames)[:, None] * [0.01, 0.0, 0.02]
    return poses


def test_smoothing_keeps_constant_angular_velocity(rig):
    poses = turning(rig, 120, 2.0)
    saved = smooth_poses(rig, poses, 24.0, "savgol")
    assert rotation_error_deg(saved[:, :, :4], poses[:, :, :4]).max() < 1e-7
    assert np.abs(saved[:, :, 4:] - poses[:, :, 4:]).max() < 1e-9
    euro = smooth_poses(rig, poses, 24.0, "oneeuro")
    middle = slice(50, 70)  # start-up transients of both passes decay geometrically from the ends
    assert rotation_error_deg(euro[middle, :, :4], poses[middle, :, :4]).max() < 1e-4
    assert np.abs(euro[middle, :, 4:] - poses[middle, :, 4:]).max() < 1e-6
    assert np.array_equal(smooth_poses(rig, poses, 24.0, "none"), poses)
    assert jitter(rig, poses[:, :, :], 24.0) >= 0.0


def test_smoothing_halves_the_jitter_of_a_noisy_sequence(rig, sampler):
    rng = np.random.default_rng(4)
    truth = turning(rig, 48, 2.0)
    noisy = truth.copy()
    nodes = rig.joint_nodes
    noise = Rotation.from_rotvec(rng.normal(0, np.radians(2.0), (48, len(nodes), 3)).reshape(-1, 3))
    current = Rotation.from_quat(np.roll(truth[:, nodes, :4], -1, axis=2).reshape(-1, 4))
    noisy[:, nodes, :4] = np.roll((current * noise).as_quat(), 1, axis=1).reshape(48, len(nodes), 4)
    before = jitter(rig, noisy, 24.0)
    base = jitter(rig, truth, 24.0)
    for method in ("savgol", "oneeuro"):
        smoothed = smooth_poses(rig, noisy, 24.0, method)
        assert jitter(rig, smoothed, 24.0) < 0.5 * before, method
        error_before = rotation_error_deg(noisy[:, nodes, :4], truth[:, nodes, :4]).mean()
        error_after = rotation_error_deg(smoothed[:, nodes, :4], truth[:, nodes, :4]).mean()
        assert error_after < error_before, method
    assert base < before


def proportioned_copy(rig, factor_legs: float):
    """The rig with every node renamed and its leg bones `factor_legs` times longer (binds rebuilt)."""
    names = tuple(f"x_{n}" if n else n for n in rig.node_names)
    translation = rig.rest_translation.copy()
    words = ("elbow", "carpus", "fetlock", "stifle", "hock")
    legs = [i for i, n in enumerate(rig.node_names) if any(w in n for w in words)]
    translation[legs] *= factor_legs
    copy = dataclasses.replace(rig, node_names=names, rest_translation=translation)
    # The new rest pose skinned with the old binds stretches the mesh with its bones; then new binds.
    vertices = posed(copy, rest_pose(copy))
    world = RigTree.of(copy).pose_world(rest_pose(copy))
    binds = np.linalg.inv(world[copy.joint_nodes])
    return dataclasses.replace(copy, vertices=vertices, inverse_bind=binds), legs


def test_retarget_to_a_renamed_reproportioned_copy(rig, sampler):
    target, legs = proportioned_copy(rig, 1.5)
    assert legs
    poses = np.stack([sampler.sample(np.random.default_rng(20 + i)) for i in range(3)])
    poses[:, :, 4:] += 0.0
    root = rig.joint_nodes[RigTree.of(rig).skeleton_roots[0]]
    poses[:, root, 4:] += [[0.0, 0.0, 0.0], [0.1, -0.05, 0.2], [0.3, 0.1, -0.2]]
    keep = [n for n in rig.joint_nodes if n != rig.joint_nodes[-1]]
    mapping = {rig.node_names[n]: f"x_{rig.node_names[n]}" for n in keep}
    out, unmatched = retarget_poses(rig, poses, target, mapping)
    assert unmatched == (target.node_names[rig.joint_nodes[-1]],)
    assert rotation_error_deg(out[:, keep, :4], poses[:, keep, :4]).max() < 1e-6
    last = rig.joint_nodes[-1]
    assert np.allclose(out[:, last], np.asarray(rest_pose(target)[last], dtype=np.float64), atol=1e-7)
    # Bone offsets are the target's own; root motion scaled by the leg lengths.
    others = [n for n in rig.joint_nodes if n != root]
    assert np.allclose(out[:, others, 4:], target.rest_translation[others], atol=1e-7)
    ratio = leg_length(target) / leg_length(rig)
    assert ratio > 1.2
    moved = out[:, root, 4:] - target.rest_translation[root]
    assert np.allclose(moved, ratio * (poses[:, root, 4:] - rig.rest_translation[root]), atol=1e-6)
    with pytest.raises(SkeletonError, match="not a joint of the target"):
        retarget_poses(rig, poses, target, {rig.node_names[root]: "nope"})


def test_lbs_jacobian_matches_central_differences_with_scaled_parents(rig):
    from dualpm.skeleton import fit as fitting

    scale = rig.rest_scale.copy()
    scale[2], scale[5] = [1.5, 0.8, 1.2], [2.0, 2.0, 2.0]  # non-uniform and uniform scales above joints
    scaled = dataclasses.replace(rig, rest_scale=scale)
    rng = np.random.default_rng(7)
    vertices = scaled.vertices.astype(np.float64)
    frame = FrameObservation(vertices, vertices + rng.normal(0, 0.05, vertices.shape), rng.uniform(0.5, 2, len(vertices)))
    tree = RigTree.of(scaled)
    prepared = fitting._prepare(scaled, 0, frame, fitting.rig_size(scaled))
    problem = fitting._LbsProblem(tree, prepared, tree.rest.copy(), np.ones(tree.num_joints, dtype=bool))
    x = problem.x0() + rng.normal(0, 0.2, problem.x0().shape)
    step = 1e-6
    numeric = np.stack([(problem.residuals(x + step * e) - problem.residuals(x - step * e)) / (2 * step)
                        for e in np.eye(len(x))], axis=1)
    assert np.abs(problem.jacobian(x) - numeric).max() < 1e-7 * np.abs(numeric).max()


def test_pose_prior_keeps_exact_fits_and_holds_noisy_joints_near_rest(rig, sampler):
    size = np.ptp(rig.vertices, axis=0).max()
    pose = sampler.sample(np.random.default_rng(5))
    exact = fit_sequence(rig, [observe(rig, pose)], spread=np.radians(20.0))
    assert np.abs(posed(rig, exact.poses[0]) - posed(rig, pose)).max() < 1e-6 * size  # no noise: no pull
    # The truth is the rest pose moved as a whole; the points carry noise of 4% of the body.
    tree = RigTree.of(rig)
    root = rig.joint_nodes[tree.skeleton_roots[0]]
    truth_pose = rest_pose(rig).astype(np.float64)
    truth_pose[root, 4:] += [0.3, -0.1, 0.2]
    rng = np.random.default_rng(6)
    noisy = observe(rig, truth_pose)
    noisy = dataclasses.replace(noisy, posed=noisy.posed + rng.normal(0, 0.04 * size, noisy.posed.shape))
    free = fit_sequence(rig, [noisy])
    held = fit_sequence(rig, [noisy], spread=np.radians(1e-3))
    others = np.setdiff1d(rig.joint_nodes, [root])
    assert rotation_error_deg(held.poses[0, others, :4], truth_pose[others, :4]).max() < 0.01
    assert rotation_error_deg(free.poses[0, others, :4], truth_pose[others, :4]).max() > 1.0
    assert np.abs(held.poses[0, root, 4:] - truth_pose[root, 4:]).max() < 0.01 * size  # the root still fitted
    truth = posed(rig, truth_pose)
    error = {name: np.linalg.norm(posed(rig, f.poses[0]) - truth, axis=1).mean() for name, f in
             (("free", free), ("held", held))}
    assert error["held"] < 0.5 * error["free"]
    with pytest.raises(SkeletonError, match="spread"):
        fit_sequence(rig, [noisy], spread=0.0)
