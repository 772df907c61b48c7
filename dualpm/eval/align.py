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
from dualpm.skeleton.rigid import kabsch_umeyama, similarity_matrix, umeyama_from_moments

__all__ = ["IcpResult", "apply_transform", "icp", "kabsch_umeyama", "similarity_matrix", "umeyama_from_moments"]


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
