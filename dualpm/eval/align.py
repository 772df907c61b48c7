"""Rigid alignment: weighted Kabsch-Umeyama fits and ICP with the benchmark's 180-degree flip (numpy).

ICP follows what the Animodel benchmark runs (github.com/tomasjakab/animodel, `src/animodel/eval.py::run_icp`
and `compute_for_sample`): point-to-point ICP (`trimesh.registration.icp` there) with rotation and
translation, no reflection and no scale (`icp_scale=False`); then the aligned prediction is turned by
180 degrees about the vertical (+Y, Y-up) axis, ICP is run again, and the alignment with the lower
symmetric Chamfer distance is kept. Animodel also rescales meshes by a voxel-volume ratio before ICP;
that needs closed meshes and does not apply to point clouds, so it is not done here.

The ICP loop is written here rather than calling trimesh's so that it uses the same reflection-safe,
weighted Kabsch-Umeyama step as the skeleton fits, stops on a tolerance in scene units, and reports
its iteration count; the correspondences come from `scipy.spatial.cKDTree`, as in trimesh.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree

from dualpm.eval.metrics import EvalError, as_points, chamfer


def umeyama_from_moments(
    mean_src: np.ndarray, mean_dst: np.ndarray, cov: np.ndarray, var_src: np.ndarray, with_scale: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form similarity fit from weighted moments (Umeyama 1991), batched over leading dims.

    Args:
        mean_src, mean_dst: (..., 3) weighted means of the source and destination points.
        cov: (..., 3, 3) weighted cross-covariance `sum_i w_i (dst_i - mean_dst)(src_i - mean_src)^T`
            with weights summing to 1.
        var_src: (...,) weighted variance of the source, `sum_i w_i |src_i - mean_src|^2`.
        with_scale: fit a uniform scale; otherwise the scale is 1.
    Returns:
        rotation (..., 3, 3) proper (det +1), translation (..., 3), scale (...,), and the weighted mean
        squared residual without `var_dst` (add `var_dst` to get it): `-2 s tr(DS) + s^2 var_src`.
    """
    u, singular, vt = np.linalg.svd(cov)
    # Reflection-safe: flip the weakest axis when U V^T would be a reflection (det < 0).
    sign = np.where(np.linalg.det(u) * np.linalg.det(vt) < 0, -1.0, 1.0)  # (...,)
    u = u.copy()
    u[..., :, 2] *= sign[..., None]
    rotation = u @ vt
    trace = singular[..., 0] + singular[..., 1] + sign * singular[..., 2]  # tr(D S)
    if with_scale:
        scale = np.divide(trace, var_src, out=np.ones_like(trace), where=var_src > 0)
    else:
        scale = np.ones_like(trace)
    translation = mean_dst - scale[..., None] * np.einsum("...ab,...b->...a", rotation, mean_src)
    partial_mse = -2.0 * scale * trace + scale**2 * var_src
    return rotation, translation, scale, partial_mse


def kabsch_umeyama(
    src: ArrayLike, dst: ArrayLike, weights: ArrayLike | None = None, with_scale: bool = False
) -> tuple[np.ndarray, np.ndarray, float | np.ndarray]:
    """Weighted least-squares rigid (or similarity) transform taking `src` onto `dst`.

    Minimises `sum_i w_i |s R src_i + t - dst_i|^2` over rotations R (det +1: reflections are never
    returned, even when the data are mirrored), translations t and, if `with_scale`, scales s > 0.
    Batched over any leading dimensions.

    Args:
        src: (..., N, 3) source points, float, scene units.
        dst: (..., N, 3) corresponding destination points.
        weights: (..., N) non-negative weights (any scale), or None for uniform; each batch entry
            needs a positive total. Fewer than 3 non-collinear weighted points leave R undetermined.
        with_scale: also fit a uniform scale.
    Returns:
        R (..., 3, 3), t (..., 3) float64 and s (float, or (...,) array when batched) with
        `dst ~= s * src @ R.T + t`.
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim < 2 or src.shape[-1] != 3:
        raise EvalError(f"kabsch_umeyama: src and dst must both be (..., N, 3), got {src.shape}, {dst.shape}")
    w = np.ones(src.shape[:-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != src.shape[:-1] or not np.isfinite(w).all() or (w < 0).any():
        raise EvalError(f"kabsch_umeyama: weights must be finite, >= 0 and of shape {src.shape[:-1]}")
    total = w.sum(axis=-1)
    if (total <= 0).any():
        raise EvalError("kabsch_umeyama: the weights sum to zero; there is nothing to fit")
    w = w / total[..., None]
    mean_src = np.einsum("...n,...nc->...c", w, src)
    mean_dst = np.einsum("...n,...nc->...c", w, dst)
    src_c, dst_c = src - mean_src[..., None, :], dst - mean_dst[..., None, :]
    cov = np.einsum("...n,...na,...nb->...ab", w, dst_c, src_c)
    var_src = np.einsum("...n,...nc,...nc->...", w, src_c, src_c)
    rotation, translation, scale, _ = umeyama_from_moments(mean_src, mean_dst, cov, var_src, with_scale)
    return rotation, translation, (float(scale) if scale.ndim == 0 else scale)


def similarity_matrix(
    rotation: np.ndarray, translation: np.ndarray, scale: float | np.ndarray = 1.0
) -> np.ndarray:
    """(..., 4, 4) matrices `[s R | t]` from rotation (..., 3, 3), translation (..., 3), scale (...,)."""
    rotation = np.asarray(rotation, dtype=np.float64)
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3] = np.asarray(scale, dtype=np.float64)[..., None, None] * rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def apply_transform(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (4, 4) affine matrix to (N, 3) points; returns (N, 3) float64."""
    return points @ matrix[:3, :3].T + matrix[:3, 3]


@dataclass(frozen=True, eq=False)
class IcpResult:
    """Outcome of `icp`: `aligned = source @ transform[:3, :3].T + transform[:3, 3]`."""

    transform: np.ndarray  # (4, 4) float64 rigid transform taking the source onto the target
    aligned: np.ndarray  # (N, 3) float64 transformed source points
    mean_distance: float  # mean distance from aligned points to their nearest target point (scene units)
    flipped: bool  # True when the 180-degree start won
    iterations: int  # ICP iterations run for the kept alignment


def _icp_run(
    source: np.ndarray, target: np.ndarray, tree: cKDTree, init: np.ndarray, iterations: int, tolerance: float
) -> tuple[np.ndarray, float, int]:
    # Point-to-point ICP: match each moved source point to its nearest target point, refit the rigid
    # transform from the original source to the matches, stop when the mean distance stops improving.
    matrix = init
    distance, index = tree.query(apply_transform(matrix, source))
    best = (matrix, float(distance.mean()))
    done = 0
    for done in range(1, iterations + 1):
        rotation, translation, _ = kabsch_umeyama(source, target[index])
        matrix = similarity_matrix(rotation, translation)
        distance, index = tree.query(apply_transform(matrix, source))
        error = float(distance.mean())
        improvement = best[1] - error
        if error < best[1]:
            best = (matrix, error)
        if improvement < tolerance:
            break
    return best[0], best[1], done


def _flip_about_vertical(points: np.ndarray) -> np.ndarray:
    # 180 degrees about the +Y axis through the centroid (Animodel turns about the world Y axis; through
    # the centroid the start does not depend on where the scene origin is).
    centre = points.mean(axis=0)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[:3, 3] = centre - flip[:3, :3] @ centre
    return flip


def icp(
    source: ArrayLike,
    target: ArrayLike,
    iterations: int = 50,
    tolerance: float = 1e-7,
    try_flip: bool = True,
    init: ArrayLike | None = None,
) -> IcpResult:
    """Rigidly align `source` to `target` with point-to-point ICP (Animodel protocol, see module docstring).

    Args:
        source: (N, 3) points to move (e.g. the predicted posed cloud), scene units, N > 0.
        target: (M, 3) points to align to (e.g. ground-truth surface samples), M > 0.
        iterations: maximum ICP iterations per start.
        tolerance: stop when one iteration lowers the mean nearest-neighbour distance by less than
            this (scene units).
        try_flip: also start from the first result turned by 180 degrees about the vertical (+Y) axis
            through its centroid, and keep whichever ends with the lower symmetric Chamfer distance.
        init: (4, 4) starting transform, or None for the identity (the clouds share a frame).
    Returns:
        `IcpResult` with the rigid transform (rotation + translation, no scale, no reflection).
    """
    source, target = as_points("ICP source", source), as_points("ICP target", target)
    if len(source) == 0 or len(target) == 0:
        raise EvalError(f"icp: cannot align empty clouds ({len(source)} source, {len(target)} target points)")
    start = np.eye(4) if init is None else np.asarray(init, dtype=np.float64)
    if start.shape != (4, 4) or not np.isfinite(start).all():
        raise EvalError(f"icp: init must be a finite (4, 4) matrix, got shape {start.shape}")
    tree = cKDTree(target)
    matrix, distance, done = _icp_run(source, target, tree, start, iterations, tolerance)
    result = IcpResult(matrix, apply_transform(matrix, source), distance, False, done)
    if try_flip:
        flipped_start = _flip_about_vertical(result.aligned) @ matrix
        matrix, distance, done = _icp_run(source, target, tree, flipped_start, iterations, tolerance)
        candidate = IcpResult(matrix, apply_transform(matrix, source), distance, True, done)
        # As in the benchmark: keep the flip only when it is strictly better by symmetric Chamfer.
        if chamfer(candidate.aligned, target).symmetric < chamfer(result.aligned, target).symmetric:
            result = candidate
    return result
