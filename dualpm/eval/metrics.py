"""Evaluation metrics on point clouds and on stored dual point maps (numpy + scipy, CPU).

Chamfer distance follows the Animodel benchmark (github.com/tomasjakab/animodel:
`src/animodel/utils/mesh.py::compute_trimesh_chamfer` and
`src/animodel/eval.py::calculate_chamfer_distances`), of which DualPM's AnimodelPoints is the
point-cloud variant:

- one direction, A -> B: the mean over the points of A of the Euclidean distance (not squared) to the
  nearest point of B;
- symmetric ("bidirectional" there): the mean of the two directions, (A->B + B->A) / 2, not their sum;
- unit-cube scaling: every distance multiplied by 1 / (longest side of the target's axis-aligned box),
  i.e. as if the target were scaled to fit inside a unit cube. Only the scale matters for distances;
  the box centre is returned too so clouds can be mapped into that cube for inspection.

Animodel samples both meshes' surfaces; here the prediction is already a point cloud and only the
ground-truth mesh is sampled (`sample_surface`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import trimesh
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree

from dualpm.errors import DualPMError
from dualpm.geometry import checked_points


class EvalError(DualPMError):
    """Evaluation inputs that cannot be measured (wrong shape, non-finite, empty ground truth)."""


def as_points(name: str, points: ArrayLike) -> np.ndarray:
    """`points` as a (N, 3) float64 array; raises `EvalError` naming `name` if it is not finite (N, 3)."""
    return checked_points(name, points, EvalError)


@dataclass(frozen=True)
class ChamferResult:
    """Chamfer distances in the units of the inputs (see the module docstring for the definitions)."""

    pred_to_target: float  # mean distance from each predicted point to the nearest target point
    target_to_pred: float  # mean distance from each target point to the nearest predicted point
    symmetric: float  # (pred_to_target + target_to_pred) / 2

    def scaled(self, factor: float) -> ChamferResult:
        """All three distances multiplied by `factor` (distances scale linearly with the clouds)."""
        return ChamferResult(
            self.pred_to_target * factor, self.target_to_pred * factor, self.symmetric * factor
        )


def chamfer(pred: ArrayLike, target: ArrayLike) -> ChamferResult:
    """Chamfer distances between a predicted and a target point cloud (Animodel definition).

    Args:
        pred: (N, 3) predicted points, any float dtype, scene units. N may be 0: an empty prediction
            scores `inf` in all three fields, so it is never silently dropped from averages.
        target: (M, 3) target points, same units; M must be > 0 (an empty ground truth is a data error).
    Returns:
        `ChamferResult` of Python floats in scene units.
    """
    pred = as_points("prediction", pred)
    target = as_points("target", target)
    if len(target) == 0:
        raise EvalError("target: the ground-truth point cloud is empty; Chamfer distance is undefined")
    if len(pred) == 0:
        return ChamferResult(float("inf"), float("inf"), float("inf"))
    pred_to_target = float(cKDTree(target).query(pred)[0].mean())
    target_to_pred = float(cKDTree(pred).query(target)[0].mean())
    return ChamferResult(pred_to_target, target_to_pred, 0.5 * (pred_to_target + target_to_pred))


def unit_cube_transform(target: ArrayLike) -> tuple[np.ndarray, float]:
    """Centre and scale that fit `target` into a unit cube: `(p - centre) * scale` lies in [-0.5, 0.5]^3.

    Args:
        target: (M, 3) points, scene units, M > 0, not all identical.
    Returns:
        centre (3,) float64, the centre of the axis-aligned bounding box (scene units);
        scale, 1 / the longest side of that box (1 / scene units), as in Animodel.
    """
    target = as_points("target", target)
    if len(target) == 0:
        raise EvalError("target: the ground-truth point cloud is empty; it has no bounding box")
    low, high = target.min(axis=0), target.max(axis=0)
    longest = float((high - low).max())
    if longest <= 0:
        raise EvalError("target: all points coincide; the bounding box has no size to normalise by")
    return 0.5 * (low + high), 1.0 / longest


def to_unit_cube(
    pred: ArrayLike, target: ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the target's `unit_cube_transform` to both clouds; returns (pred (N,3), target (M,3))."""
    pred, target = as_points("prediction", pred), as_points("target", target)
    centre, scale = unit_cube_transform(target)
    return (pred - centre) * scale, (target - centre) * scale


def unit_cube_chamfer(pred: ArrayLike, target: ArrayLike) -> ChamferResult:
    """`chamfer` after scaling both clouds so the target fits a unit cube (Animodel's "scaled" numbers)."""
    return chamfer(*to_unit_cube(pred, target))


def _as_mask(alpha: ArrayLike) -> np.ndarray:
    # Stored dual point maps keep alpha as float 0/1; boolean masks are taken as they are.
    array = np.asarray(alpha)
    return array if array.dtype == np.bool_ else array > 0.5


def occupancy_iou(pred_alpha: ArrayLike, gt_alpha: ArrayLike) -> np.ndarray:
    """Intersection over union of occupancy, per depth layer.

    Args:
        pred_alpha: (..., H, W, L) bool occupancy (or float alpha, occupied where > 0.5), on the CPU.
        gt_alpha: same shape as `pred_alpha`.
    Returns:
        (L,) float64 IoU over all leading dimensions and pixels; NaN for a layer where both are empty
        (undefined, so that `np.nanmean` over a data set skips it rather than counting it as perfect).
    """
    pred, gt = _as_mask(pred_alpha), _as_mask(gt_alpha)
    if pred.shape != gt.shape or pred.ndim < 3:
        raise EvalError(f"occupancy_iou: shapes {pred.shape} and {gt.shape} must be equal and (..., H, W, L)")
    axes = tuple(range(pred.ndim - 1))
    intersection = (pred & gt).sum(axis=axes)
    union = (pred | gt).sum(axis=axes)
    return np.divide(intersection, union, out=np.full(union.shape, np.nan), where=union > 0)


def masked_point_error(
    pred: ArrayLike, gt: ArrayLike, valid: ArrayLike
) -> np.ndarray:
    """Mean Euclidean distance between predicted and ground-truth points over valid pixels, per layer.

    Args:
        pred: (..., H, W, L, 3) predicted points (canonical or posed), scene units.
        gt: same shape, ground-truth points.
        valid: (..., H, W, L) bool (or float alpha, valid where > 0.5): pixels to measure, e.g. the
            ground-truth alpha (optionally and-ed with the predicted one).
    Returns:
        (L,) float64 mean error in scene units; NaN for a layer with no valid pixel.
    """
    pred, gt = np.asarray(pred, dtype=np.float64), np.asarray(gt, dtype=np.float64)
    mask = _as_mask(valid)
    if pred.shape != gt.shape or pred.shape[-1] != 3 or pred.shape[:-1] != mask.shape or mask.ndim < 3:
        raise EvalError(
            f"masked_point_error: expected pred/gt (..., H, W, L, 3) and valid (..., H, W, L), "
            f"got {pred.shape}, {gt.shape}, {mask.shape}"
        )
    error = np.linalg.norm(pred - gt, axis=-1)  # (..., H, W, L)
    if not np.isfinite(error[mask]).all():
        raise EvalError("masked_point_error: NaN or infinite points at valid pixels")
    axes = tuple(range(mask.ndim - 1))
    total = np.where(mask, error, 0.0).sum(axis=axes)
    count = mask.sum(axis=axes)
    return np.divide(total, count, out=np.full(count.shape, np.nan), where=count > 0)


def sample_surface(
    vertices: ArrayLike, faces: ArrayLike, count: int, seed: int
) -> np.ndarray:
    """Area-weighted uniform random points on a triangle mesh (trimesh.sample.sample_surface).

    Args:
        vertices: (V, 3) float vertex positions, scene units.
        faces: (F, 3) integer vertex indices.
        count: number of points to draw (> 0).
        seed: seed of the random generator; the same inputs and seed give the same points.
    Returns:
        (count, 3) float64 points on the surface, scene units.
    """
    vertices = as_points("mesh vertices", vertices)
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3 or not np.issubdtype(faces.dtype, np.integer):
        raise EvalError(f"mesh faces: expected integer triangles (F, 3), got {faces.dtype} {faces.shape}")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise EvalError(
            f"mesh faces: vertex indices must lie in [0, {len(vertices)}), got {faces.min()}..{faces.max()}"
        )
    if count <= 0:
        raise EvalError(f"sample_surface: count must be positive, got {count}")
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    if not mesh.area > 0:
        raise EvalError("mesh: the surface has zero area; no points can be sampled on it")
    points, _face_index = trimesh.sample.sample_surface(mesh, count, seed=seed)
    return np.asarray(points, dtype=np.float64)
