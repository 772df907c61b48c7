"""Chamfer metrics, unit-cube scaling, IoU / point errors, surface sampling, Kabsch-Umeyama and ICP."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.spatial.transform import Rotation

from dualpm.eval import (
    EvalError,
    chamfer,
    unit_cube_chamfer,
    icp,
    kabsch_umeyama,
    masked_point_error,
    to_unit_cube,
    occupancy_iou,
    sample_surface,
    unit_cube_transform,
)
from dualpm.skeleton.rigid import SkeletonError


def grid(spacing: float = 1.0) -> np.ndarray:
    axis = np.arange(4) * spacing
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)


def animal(count: int, rng: np.random.Generator) -> np.ndarray:
    """Anisotropic blobs (body, head, tail, legs) without rotational symmetry."""
    centres = np.array([[0, 0, 0], [0.9, 0.35, 0], [-0.8, 0.15, 0.05], [0.5, -0.5, 0.2], [-0.5, -0.5, -0.2]])
    scales = np.array(
        [[0.5, 0.22, 0.2], [0.15, 0.12, 0.1], [0.25, 0.04, 0.04], [0.05, 0.2, 0.05], [0.05, 0.2, 0.05]]
    )
    part = rng.integers(0, len(centres), count)
    return centres[part] + scales[part] * rng.standard_normal((count, 3))


def rotation_about(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(np.radians(degrees) * axis / np.linalg.norm(axis)).as_matrix()


# ---------------------------------------------------------------- Chamfer


def test_chamfer_identical_clouds_is_zero():
    points = np.random.default_rng(0).normal(size=(300, 3))
    result = chamfer(points, points)
    assert (result.pred_to_target, result.target_to_pred, result.symmetric) == (0.0, 0.0, 0.0)


def test_chamfer_of_translated_grid_is_the_translation_length_both_ways():
    target = grid(spacing=1.0)
    shift = np.array([0.1, 0.2, 0.05])  # |shift| < spacing / 2: every point's nearest is its own copy
    result = chamfer(target + shift, target)
    length = np.linalg.norm(shift)  # Euclidean, not squared (Animodel)
    assert result.pred_to_target == pytest.approx(length, abs=1e-12)
    assert result.target_to_pred == pytest.approx(length, abs=1e-12)
    assert result.symmetric == pytest.approx(length, abs=1e-12)


def test_chamfer_asymmetric_example_by_hand():
    pred = np.array([[0.0, 0, 0], [10.0, 0, 0]])
    target = np.array([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]])
    result = chamfer(pred, target)
    assert result.pred_to_target == pytest.approx((0 + 8) / 2)  # 10 -> nearest target 2
    assert result.target_to_pred == pytest.approx((0 + 1 + 2) / 3)
    assert result.symmetric == pytest.approx((4 + 1) / 2)  # mean of the two directions, not the sum


def test_chamfer_matches_brute_force_distances():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(200, 3)), rng.normal(size=(150, 3)) + 0.3
    distances = cdist(pred, target)
    result = chamfer(pred.astype(np.float32), target)
    assert result.pred_to_target == pytest.approx(distances.min(axis=1).mean(), rel=1e-6)
    assert result.target_to_pred == pytest.approx(distances.min(axis=0).mean(), rel=1e-6)


def test_chamfer_empty_and_invalid_inputs():
    target = grid()
    empty = chamfer(np.zeros((0, 3)), target)
    assert empty.pred_to_target == empty.target_to_pred == empty.symmetric == float("inf")
    with pytest.raises(EvalError, match="target"):
        chamfer(target, np.zeros((0, 3)))
    with pytest.raises(EvalError, match=r"\(N, 3\)"):
        chamfer(np.zeros((4, 2)), target)
    bad = target.copy()
    bad[3, 1] = np.nan
    with pytest.raises(EvalError, match="1 points are NaN"):
        chamfer(bad, target)


def test_unit_cube_normalisation_of_a_box_of_known_size():
    corners = np.array([[x, y, z] for x in (0, 2) for y in (0, 4) for z in (0, 1)], dtype=np.float64)
    target = corners + np.array([0.0, 0.0, 2.5])  # box 2 x 4 x 1 centred at (1, 2, 3)
    centre, scale = unit_cube_transform(target)
    np.testing.assert_array_equal(centre, [1.0, 2.0, 3.0])
    assert scale == 0.25
    pred = target + np.array([0.4, 0.0, 0.0])
    pred_n, target_n = to_unit_cube(pred, target)
    np.testing.assert_array_equal(target_n.min(axis=0), [-0.25, -0.5, -0.125])
    np.testing.assert_array_equal(target_n.max(axis=0), [0.25, 0.5, 0.125])
    scaled = unit_cube_chamfer(pred, target)
    assert scaled.symmetric == pytest.approx(0.4 * 0.25, abs=1e-12)
    unscaled = chamfer(pred, target).scaled(scale)
    assert scaled.pred_to_target == pytest.approx(unscaled.pred_to_target, abs=1e-12)
    with pytest.raises(EvalError, match="coincide"):
        unit_cube_transform(np.ones((5, 3)))


# ---------------------------------------------------------------- per-layer metrics


def test_occupancy_iou_per_layer():
    pred = np.zeros((2, 2, 2), dtype=bool)  # (H, W, L)
    gt = np.zeros((2, 2, 2), dtype=bool)
    pred[0, 0, 0] = pred[0, 1, 0] = True
    gt[0, 1, 0] = gt[1, 1, 0] = True  # layer 0: 1 shared of 3 occupied; layer 1: empty in both
    iou = occupancy_iou(pred, gt)
    assert iou[0] == pytest.approx(1 / 3)
    assert np.isnan(iou[1])
    batched = occupancy_iou(np.stack([pred, pred]).astype(np.float32), np.stack([gt, pred]))
    assert batched[0] == pytest.approx((1 + 2) / (3 + 2))  # float alpha accepted; batch pooled
    with pytest.raises(EvalError):
        occupancy_iou(pred, gt[:1])


def test_masked_point_error_per_layer():
    gt = np.zeros((1, 2, 2, 3))  # (H, W, L, 3)
    pred = gt.copy()
    pred[0, 0, 0] = [3.0, 4.0, 0.0]  # error 5
    pred[0, 1, 1] = [np.nan, 0, 0]  # invalid pixel: ignored
    valid = np.zeros((1, 2, 2), dtype=bool)
    valid[0, 0, 0] = valid[0, 1, 0] = True  # layer 0: errors 5 and 0; layer 1: nothing valid
    error = masked_point_error(pred, gt, valid)
    assert error[0] == pytest.approx(2.5)
    assert np.isnan(error[1])
    valid[0, 1, 1] = True
    with pytest.raises(EvalError, match="NaN"):
        masked_point_error(pred, gt, valid)


def test_sample_surface_is_seeded_on_the_surface_and_area_weighted():
    # Two disjoint triangles in z = 0 with areas 0.5 and 4.5: 10 % of samples on the small one.
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 3, 0]], dtype=np.float64)
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    points = sample_surface(vertices, faces, 20000, seed=3)
    assert points.shape == (20000, 3)
    assert (points[:, 2] == 0).all()
    small = points[:, 0] <= 1
    assert (points[small].sum(axis=1) <= 1 + 1e-12).all()  # inside the small triangle
    assert small.mean() == pytest.approx(0.1, abs=0.01)  # binomial sd 0.002
    np.testing.assert_array_equal(points, sample_surface(vertices, faces, 20000, seed=3))
    assert not np.array_equal(points, sample_surface(vertices, faces, 20000, seed=4))
    with pytest.raises(EvalError, match="indices"):
        sample_surface(vertices, faces + 1, 10, seed=0)
    with pytest.raises(EvalError, match="zero area"):
        sample_surface(np.zeros((3, 3)), [[0, 1, 2]], 10, seed=0)


# ---------------------------------------------------------------- Kabsch-Umeyama


@pytest.mark.parametrize("with_scale", [False, True])
def test_kabsch_umeyama_recovers_exact_transform_with_weights(with_scale):
    rng = np.random.default_rng(2)
    src = rng.normal(size=(50, 3))
    rotation = Rotation.random(random_state=5).as_matrix()
    translation = np.array([0.3, -2.0, 1.5])
    scale = 1.7 if with_scale else 1.0
    dst = scale * src @ rotation.T + translation
    weights = rng.uniform(0.1, 2.0, size=50)
    r, t, s = kabsch_umeyama(src, dst, weights, with_scale=with_scale)
    np.testing.assert_allclose(r, rotation, atol=1e-12, rtol=0)
    np.testing.assert_allclose(t, translation, atol=1e-12, rtol=0)
    assert s == pytest.approx(scale, abs=1e-12)


def test_kabsch_umeyama_zero_weights_ignore_outliers():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(40, 3))
    rotation = rotation_about([1, 2, 3], 70)
    dst = src @ rotation.T + 1.0
    dst[:10] += rng.normal(scale=5.0, size=(10, 3))  # corrupted pairs, weight 0
    weights = np.r_[np.zeros(10), np.ones(30)]
    r, t, _ = kabsch_umeyama(src, dst, weights)
    np.testing.assert_allclose(r, rotation, atol=1e-12, rtol=0)
    np.testing.assert_allclose(t, np.ones(3), atol=1e-12, rtol=0)


def test_kabsch_umeyama_weights_match_duplicated_points_and_scipy():
    # Independent references on noisy data: integer weights == duplicated rows, and scipy's
    # weighted Wahba solver on the weighted-centred points gives the same rotation.
    rng = np.random.default_rng(4)
    src = rng.normal(size=(30, 3))
    dst = src @ rotation_about([0, 1, 0], 40).T + rng.normal(scale=0.2, size=(30, 3))
    counts = rng.integers(1, 4, size=30)
    r, t, s = kabsch_umeyama(src, dst, counts.astype(np.float64), with_scale=True)
    repeated_src, repeated_dst = np.repeat(src, counts, axis=0), np.repeat(dst, counts, axis=0)
    r2, t2, s2 = kabsch_umeyama(repeated_src, repeated_dst, with_scale=True)
    np.testing.assert_allclose(r, r2, atol=1e-12, rtol=0)
    np.testing.assert_allclose(t, t2, atol=1e-12, rtol=0)
    assert s == pytest.approx(s2, abs=1e-12)
    r1, _, _ = kabsch_umeyama(src, dst, counts.astype(np.float64))
    w = counts / counts.sum()
    src_c, dst_c = src - w @ src, dst - w @ dst
    reference, _ = Rotation.align_vectors(dst_c, src_c, weights=counts.astype(np.float64))
    np.testing.assert_allclose(r1, reference.as_matrix(), atol=1e-10, rtol=0)


def test_kabsch_umeyama_never_returns_a_reflection():
    # Axis-aligned cross with spreads 0.2 < 1 < 2: covariance is diagonal. Mirroring x (the weakest
    # axis) is best approximated by the identity rotation, not by the reflection itself.
    src = np.concatenate([np.diag([0.2, 1.0, 2.0]), -np.diag([0.2, 1.0, 2.0])])  # (6, 3)
    mirrored = src * np.array([-1.0, 1, 1])
    r, t, s = kabsch_umeyama(src, mirrored, with_scale=True)
    assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(r, np.eye(3), atol=1e-12, rtol=0)
    np.testing.assert_allclose(t, 0.0, atol=1e-12, rtol=0)
    # With scale: s = tr(D S) / var_src, the mirrored axis counting negatively.
    assert s == pytest.approx((1 + 4 - 0.04) / (0.04 + 1 + 4), abs=1e-12)


def test_kabsch_umeyama_batched_equals_one_by_one():
    rng = np.random.default_rng(6)
    src, dst = rng.normal(size=(2, 3, 20, 3)), rng.normal(size=(2, 3, 20, 3))
    weights = rng.uniform(size=(2, 3, 20))
    r, t, s = kabsch_umeyama(src, dst, weights, with_scale=True)
    assert r.shape == (2, 3, 3, 3) and t.shape == (2, 3, 3) and s.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            r1, t1, s1 = kabsch_umeyama(src[i, j], dst[i, j], weights[i, j], with_scale=True)
            np.testing.assert_allclose(r[i, j], r1, atol=1e-12, rtol=0)
            np.testing.assert_allclose(t[i, j], t1, atol=1e-12, rtol=0)
            assert s[i, j] == pytest.approx(s1, abs=1e-12)
    with pytest.raises(SkeletonError, match="sum to zero"):
        kabsch_umeyama(src[0, 0], dst[0, 0], np.zeros(20))


# ---------------------------------------------------------------- ICP


def test_icp_recovers_random_rigid_transforms_up_to_30_degrees():
    rng = np.random.default_rng(7)
    source = animal(1500, rng)
    for _ in range(5):
        axis = rng.normal(size=3)
        rotation = rotation_about(axis, rng.uniform(10, 30))
        translation = rng.uniform(-0.1, 0.1, size=3)
        target = source @ rotation.T + translation
        result = icp(source, target[rng.permutation(len(target))], try_flip=False)
        np.testing.assert_allclose(result.transform[:3, :3], rotation, atol=1e-5, rtol=0)
        np.testing.assert_allclose(result.transform[:3, 3], translation, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(result.transform[3], [0, 0, 0, 1])
        np.testing.assert_allclose(result.aligned, target, atol=1e-5, rtol=0)
        assert result.mean_distance < 1e-5 and not result.flipped
        reference = chamfer(result.aligned, target).pred_to_target
        assert result.mean_distance == pytest.approx(reference, abs=1e-12)


def test_icp_flip_recovers_180_degrees_only_when_tried():
    rng = np.random.default_rng(8)
    source = animal(1500, rng)
    rotation = rotation_about([0, 1, 0], 180) @ rotation_about([1, 0, 1], 8)
    translation = np.array([0.05, 0.0, -0.03])
    target = source @ rotation.T + translation
    stuck = icp(source, target, try_flip=False)
    assert np.abs(stuck.transform[:3, :3] - rotation).max() > 0.5  # local minimum far from the truth
    assert stuck.mean_distance > 0.01
    found = icp(source, target, try_flip=True)
    assert found.flipped
    np.testing.assert_allclose(found.transform[:3, :3], rotation, atol=1e-5, rtol=0)
    np.testing.assert_allclose(found.transform[:3, 3], translation, atol=1e-5, rtol=0)
    assert found.mean_distance < 1e-5


def test_icp_init_and_errors():
    rng = np.random.default_rng(9)
    source = animal(500, rng)
    truth = np.eye(4)
    truth[:3, :3] = rotation_about([1, 1, 0], 170)
    truth[:3, 3] = [1.0, 2.0, 3.0]
    target = source @ truth[:3, :3].T + truth[:3, 3]
    result = icp(source, target, try_flip=False, init=truth)  # start at the answer: stays there
    np.testing.assert_allclose(result.transform, truth, atol=1e-12, rtol=0)
    assert result.iterations == 1
    with pytest.raises(EvalError, match="empty"):
        icp(np.zeros((0, 3)), target)
    with pytest.raises(EvalError, match="init"):
        icp(source, target, init=np.eye(3))
