"""Skeleton estimation from a dual point map: per-joint rigid fits from canonical to posed points (numpy).

Every predicted point comes as a pair (canonical xyz, posed xyz). Looking the canonical point up on the
template mesh gives its skin weights; the points a joint moves give, by a weighted Kabsch-Umeyama fit,
that joint's transform from canonical (bind pose) to posed space, the same matrix as skinning's
`joint_matrices` (= global @ inverse_bind). This follows DualPM's reference code
(github.com/DualPM/DualPM_Paper, `src/dualpm_paper/bones.py` and `scripts/estimate_skeleton.py`: nearest
template vertex, keep points whose weight for the joint exceeds 0.5, rigid fit without scale), except
that the kept points are weighted by their skin weight and all joints are fitted at once (batched SVD).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike
from scipy.spatial import cKDTree

from dualpm.fileio import atomic_write_json
from dualpm.skeleton.rigid import SkeletonError, as_points, kabsch_umeyama, similarity_matrix, umeyama_from_moments

if TYPE_CHECKING:
    from dualpm.gltf import SkinnedMesh

SKELETON_FORMAT = "dualpm-skeleton"
SKELETON_VERSION = 1


def _checked_skin(joints: ArrayLike, weights: ArrayLike, num_joints: int) -> tuple[np.ndarray, np.ndarray]:
    joints, weights = np.asarray(joints), np.asarray(weights, dtype=np.float64)
    if joints.ndim != 2 or joints.shape != weights.shape or not np.issubdtype(joints.dtype, np.integer):
        raise SkeletonError(
            f"skin: joints {joints.dtype} {joints.shape} and weights {weights.shape} must be (V, K) int/float"
        )
    if joints.size and (joints.min() < 0 or joints.max() >= num_joints):
        raise SkeletonError(
            f"skin: joint indices must lie in [0, {num_joints}), got {joints.min()}..{joints.max()}"
        )
    return joints, weights


def dense_skin_weights(joints: ArrayLike, weights: ArrayLike, num_joints: int) -> np.ndarray:
    """Expand per-vertex (joint index, weight) pairs to a dense matrix.

    Args:
        joints: (V, K) integer joint indices into the skin's joint list (glTF JOINTS_0).
        weights: (V, K) float weights (glTF WEIGHTS_0); repeated indices add up.
        num_joints: J, the number of joints of the skin.
    Returns:
        (V, J) float32 weights.
    """
    joints, weights = _checked_skin(joints, weights, num_joints)
    dense = np.zeros((joints.shape[0], num_joints), dtype=np.float32)
    rows = np.broadcast_to(np.arange(joints.shape[0])[:, None], joints.shape)
    np.add.at(dense, (rows, joints), weights.astype(np.float32))
    return dense


def skin_weights_at(
    points_canonical: ArrayLike, mesh: SkinnedMesh, k: int = 1, max_distance: float | None = None
) -> np.ndarray:
    """Skin weights of canonical points, taken from the nearest template vertices.

    Args:
        points_canonical: (P, 3) float canonical (bind-pose) points, scene units, CPU.
        mesh: the template; uses `vertices (V, 3)`, `joints (V, K)`, `weights (V, K)`, `joint_nodes (J,)`
            (numpy arrays or CPU tensors).
        k: 1 copies the nearest vertex's weights; k > 1 blends the k nearest by inverse distance.
        max_distance: points farther than this from every vertex get all-zero weights (outliers of the
            prediction); None keeps all (the reference uses 0.5 scene units).
    Returns:
        (P, J) float32 weights.
    """
    points = as_points("canonical points", points_canonical)
    vertices = as_points("template vertices", np.asarray(mesh.vertices))
    dense = dense_skin_weights(np.asarray(mesh.joints), np.asarray(mesh.weights), len(mesh.joint_nodes))
    if len(dense) != len(vertices):
        raise SkeletonError(f"skin: {len(dense)} skinned vertices but {len(vertices)} vertex positions")
    if k < 1 or k > len(vertices):
        raise SkeletonError(f"skin_weights_at: k must lie in [1, {len(vertices)}], got {k}")
    distance, index = cKDTree(vertices).query(points, k=k)
    if k == 1:
        out = dense[index]
        nearest = distance
    else:
        inverse = 1.0 / np.maximum(distance, 1e-12)  # (P, k); an exact hit dominates the blend
        blend = (inverse / inverse.sum(axis=1, keepdims=True)).astype(np.float32)
        out = np.zeros((len(points), dense.shape[1]), dtype=np.float32)
        for i in range(k):  # k is small; avoids a (P, k, J) temporary
            out += blend[:, i, None] * dense[index[:, i]]
        nearest = distance[:, 0]
    if max_distance is not None:
        out[nearest > max_distance] = 0.0
    return out


def joint_parents(mesh: SkinnedMesh) -> np.ndarray:
    """Parent of each joint in joint order: the nearest ancestor node that is a joint of the skin.

    Args:
        mesh: uses `parents (N,)` (parent node index per node, -1 for roots) and `joint_nodes (J,)`.
    Returns:
        (J,) int64 joint indices, -1 where no ancestor is a joint.
    """
    parents = np.asarray(mesh.parents, dtype=np.int64)
    joint_nodes = np.asarray(mesh.joint_nodes, dtype=np.int64)
    node_to_joint = np.full(len(parents), -1, dtype=np.int64)
    node_to_joint[joint_nodes] = np.arange(len(joint_nodes))
    result = np.full(len(joint_nodes), -1, dtype=np.int64)
    current = parents[joint_nodes]
    pending = current >= 0
    for _ in range(len(parents)):  # one step up the tree per pass; depth <= number of nodes
        if not pending.any():
            return result
        found = pending & (node_to_joint[np.maximum(current, 0)] >= 0)
        result[found] = node_to_joint[current[found]]
        pending &= ~found
        current = np.where(pending, parents[np.maximum(current, 0)], current)
        pending &= current >= 0
    raise SkeletonError("skeleton: the node hierarchy has a cycle")


@dataclass(frozen=True, eq=False)
class JointFit:
    """Per-joint transforms estimated by `estimate_joint_transforms`."""

    transforms: np.ndarray  # (J, 4, 4) float64: canonical (bind-pose) points -> posed points
    valid: np.ndarray  # (J,) bool: the joint had enough support for its own fit
    residual: np.ndarray  # (J,) float64 weighted RMS distance of the own fit (scene units), NaN if invalid
    source: np.ndarray  # (J,) int64 joint whose fit is used (itself or a valid ancestor), -1: global fit


def estimate_joint_transforms(
    canonical: ArrayLike,
    posed: ArrayLike,
    weights: ArrayLike,
    min_weight: float = 0.5,
    min_points: int = 3,
    with_scale: bool = False,
    parents: ArrayLike | None = None,
) -> JointFit:
    """Fit every joint's rigid transform from canonical to posed points in one batched solve.

    Joint j's fit uses the points whose skin weight for j is at least `min_weight`, each weighted by
    that skin weight. A joint is invalid when fewer than `min_points` points qualify or they are
    (nearly) collinear; it then borrows the transform of its nearest valid ancestor in `parents`, or,
    without one, the global fit (all points, equal weights) - so every joint gets a usable transform.

    Args:
        canonical: (P, 3) float canonical points, scene units, CPU.
        posed: (P, 3) float posed points paired row by row with `canonical`.
        weights: (P, J) float skin weights of the points (e.g. `skin_weights_at`).
        min_weight: smallest skin weight for a point to count towards a joint.
        min_points: smallest number of counted points for a joint's own fit (>= 3).
        with_scale: also fit a uniform scale per joint (the reference fits rotation + translation).
        parents: (J,) int joint parents (-1 for roots, see `joint_parents`) or None.
    Returns:
        `JointFit`.
    """
    canonical, posed = as_points("canonical points", canonical), as_points("posed points", posed)
    skin = np.asarray(weights, dtype=np.float64)
    if len(canonical) != len(posed) or skin.ndim != 2 or skin.shape[0] != len(canonical):
        raise SkeletonError(
            f"estimate_joint_transforms: expected canonical (P, 3), posed (P, 3) and weights (P, J), "
            f"got {canonical.shape}, {posed.shape}, {skin.shape}"
        )
    if min_points < 3 or not min_weight > 0:
        raise SkeletonError(
            "estimate_joint_transforms: need min_points >= 3 and min_weight > 0, "
            f"got {min_points} and {min_weight}"
        )
    num_joints = skin.shape[1]
    if len(canonical) < 3:
        raise SkeletonError(f"estimate_joint_transforms: {len(canonical)} point pairs cannot fix a rotation")

    # Centre both clouds first so the moment sums below do not lose precision far from the origin.
    src_origin, dst_origin = canonical.mean(axis=0), posed.mean(axis=0)
    src, dst = canonical - src_origin, posed - dst_origin
    used = np.where(skin >= min_weight, skin, 0.0).T  # (J, P)
    count = (used > 0).sum(axis=1)
    total = used.sum(axis=1)
    w = used / np.maximum(total, 1e-300)[:, None]  # (J, P), rows sum to 1 (or are all zero)

    # Weighted moments of every joint at once: P x 9 products instead of a (J, P, 3) temporary.
    mean_src, mean_dst = w @ src, w @ dst  # (J, 3)
    cross = (w @ (dst[:, :, None] * src[:, None, :]).reshape(-1, 9)).reshape(-1, 3, 3)  # (J, 3, 3)
    cov = cross - mean_dst[:, :, None] * mean_src[:, None, :]
    var_src = w @ (src**2).sum(axis=1) - (mean_src**2).sum(axis=1)
    var_dst = w @ (dst**2).sum(axis=1) - (mean_dst**2).sum(axis=1)
    rotation, translation, scale, partial = umeyama_from_moments(mean_src, mean_dst, cov, var_src, with_scale)
    # Undo the centring: dst_origin + s R (x - src_origin) + t.
    translation = translation + dst_origin - scale[:, None] * (rotation @ src_origin)
    fitted = similarity_matrix(rotation, translation, scale)

    # Collinear (or single-point) support leaves the rotation about that line free: second singular
    # value of the canonical scatter ~ 0 relative to the first.
    scatter = (w @ (src[:, :, None] * src[:, None, :]).reshape(-1, 9)).reshape(-1, 3, 3)
    scatter -= mean_src[:, :, None] * mean_src[:, None, :]
    spread = np.linalg.eigvalsh(scatter)  # ascending, (J, 3)
    valid = (count >= min_points) & (spread[:, 1] > 1e-10 * np.maximum(spread[:, 2], 1e-300))
    residual = np.where(valid, np.sqrt(np.maximum(var_dst + partial, 0.0)), np.nan)

    joint_parent = np.full(num_joints, -1) if parents is None else np.asarray(parents, dtype=np.int64)
    if joint_parent.shape != (num_joints,) or (joint_parent >= num_joints).any():
        raise SkeletonError(f"estimate_joint_transforms: parents must be ({num_joints},) joint indices or -1")
    source = np.where(valid, np.arange(num_joints), joint_parent)
    for _ in range(num_joints + 1):  # climb one level per pass until a valid ancestor (or none) is reached
        climbing = (source >= 0) & ~valid[np.maximum(source, 0)]
        if not climbing.any():
            break
        source[climbing] = joint_parent[source[climbing]]
    else:
        raise SkeletonError("estimate_joint_transforms: the joint parents form a cycle")

    rot, trans, s = kabsch_umeyama(canonical, posed, with_scale=with_scale)
    global_fit = similarity_matrix(rot, trans, s)
    transforms = np.where((source >= 0)[:, None, None], fitted[np.maximum(source, 0)], global_fit)
    return JointFit(transforms, valid, residual, source)


def repose_vertices(
    vertices: ArrayLike, joints: ArrayLike, weights: ArrayLike, transforms: ArrayLike
) -> np.ndarray:
    """Linear-blend skinning of template vertices with given per-joint transforms.

    Args:
        vertices: (V, 3) float canonical (bind-pose) vertices, scene units.
        joints: (V, K) integer joint indices; weights: (V, K) float skin weights (used as stored).
        transforms: (J, 4, 4) float joint transforms, canonical -> posed (e.g. `JointFit.transforms`).
    Returns:
        (V, 3) float64 posed vertices: `sum_k w_vk * T[j_vk] @ [v, 1]`.
    """
    vertices = as_points("template vertices", vertices)
    transforms = np.asarray(transforms, dtype=np.float64)
    if transforms.ndim != 3 or transforms.shape[1:] != (4, 4):
        raise SkeletonError(f"repose_vertices: transforms must be (J, 4, 4), got {transforms.shape}")
    joints, weights = _checked_skin(joints, weights, len(transforms))
    if len(joints) != len(vertices):
        raise SkeletonError(f"repose_vertices: {len(joints)} skinned vertices but {len(vertices)} positions")
    blended = np.einsum("vk,vkab->vab", weights, transforms[joints])  # (V, 4, 4)
    return np.einsum("vab,vb->va", blended[:, :3, :3], vertices) + blended[:, :3, 3]


def bind_positions(inverse_bind: ArrayLike) -> np.ndarray:
    """Joint origins in canonical space, (J, 3) float64, from (J, 4, 4) inverse bind matrices."""
    inverse_bind = np.asarray(inverse_bind, dtype=np.float64)
    return np.linalg.inv(inverse_bind)[:, :3, 3]


def _rotation_part(matrices: np.ndarray) -> np.ndarray:
    # Nearest rotation to the upper 3x3 block (polar factor), so fits with scale compare rotation only.
    u, _, vt = np.linalg.svd(matrices[..., :3, :3])
    sign = np.where(np.linalg.det(u @ vt) < 0, -1.0, 1.0)
    u = u.copy()
    u[..., :, 2] *= sign[..., None]
    return u @ vt


def joint_errors(
    estimated: ArrayLike, truth: ArrayLike, positions: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation error of estimated joint transforms against the true ones.

    Args:
        estimated: (J, 4, 4) estimated canonical -> posed joint transforms.
        truth: (J, 4, 4) true ones (skinning's `joint_matrices`).
        positions: (J, 3) canonical joint positions (`bind_positions(inverse_bind)`); None uses the
            canonical origin for every joint (then the error is just the difference of translations).
    Returns:
        rotation_deg (J,): angle of the relative rotation `R_est^T R_true`, degrees in [0, 180];
        translation (J,): distance between where the two transforms put the joint's canonical
        position, scene units - the posed joint-location error, independent of the joint's offset
        from the origin (a raw translation difference mixes in rotation error times that offset).
    """
    estimated, truth = np.asarray(estimated, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if estimated.shape != truth.shape or estimated.ndim != 3 or estimated.shape[1:] != (4, 4):
        raise SkeletonError(f"joint_errors: expected two (J, 4, 4) arrays, got {estimated.shape}, {truth.shape}")
    relative = _rotation_part(estimated).transpose(0, 2, 1) @ _rotation_part(truth)
    # atan2(sin, cos) is accurate at both 0 and 180 degrees, unlike arccos of the trace.
    cos = 0.5 * (np.trace(relative, axis1=1, axis2=2) - 1.0)
    sin = np.linalg.norm(relative - relative.transpose(0, 2, 1), axis=(1, 2)) / (2.0 * np.sqrt(2.0))
    rotation_deg = np.degrees(np.arctan2(sin, cos))
    where = np.zeros((len(truth), 3)) if positions is None else np.asarray(positions, dtype=np.float64)
    if where.shape != (len(truth), 3):
        raise SkeletonError(f"joint_errors: positions must be ({len(truth)}, 3), got {where.shape}")
    moved_est = np.einsum("jab,jb->ja", estimated[:, :3, :3], where) + estimated[:, :3, 3]
    moved_true = np.einsum("jab,jb->ja", truth[:, :3, :3], where) + truth[:, :3, 3]
    return rotation_deg, np.linalg.norm(moved_est - moved_true, axis=1)


def save_skeleton_json(
    path: str | os.PathLike,
    transforms: ArrayLike,
    valid: ArrayLike,
    joint_names: list[str],
    residual: ArrayLike | None = None,
) -> None:
    """Write estimated joint transforms as JSON (atomically).

    Layout: `{"format": "dualpm-skeleton", "version": 1, "joints": [{"name", "valid", "matrix",
    "residual"}, ...]}` in joint order; `matrix` is the 4x4 canonical -> posed transform as a list of
    rows (acting on column vectors); `residual` is null when unknown or invalid.
    """
    transforms = np.asarray(transforms, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    num = len(joint_names)
    res = np.full(num, np.nan) if residual is None else np.asarray(residual, dtype=np.float64)
    if transforms.shape != (num, 4, 4) or valid.shape != (num,) or res.shape != (num,):
        raise SkeletonError(
            f"save_skeleton_json: {num} joint names need transforms ({num}, 4, 4), valid ({num},) and "
            f"residual ({num},); got {transforms.shape}, {valid.shape}, {res.shape}"
        )
    joints = [
        {
            "name": name,
            "valid": bool(ok),
            "matrix": matrix.tolist(),
            "residual": float(r) if np.isfinite(r) else None,
        }
        for name, ok, matrix, r in zip(joint_names, valid, transforms, res, strict=True)
    ]
    atomic_write_json(path, {"format": SKELETON_FORMAT, "version": SKELETON_VERSION, "joints": joints})


def load_skeleton_json(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a `save_skeleton_json` file; returns transforms (J, 4, 4) float64, valid (J,) bool, names."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise SkeletonError(f"{path}: cannot read skeleton JSON ({error})") from error
    header = (data.get("format"), data.get("version")) if isinstance(data, dict) else None
    if header != (SKELETON_FORMAT, SKELETON_VERSION):
        raise SkeletonError(f"{path}: not a {SKELETON_FORMAT} version {SKELETON_VERSION} file")
    joints = data.get("joints")
    try:
        names = [str(joint["name"]) for joint in joints]
        valid = np.array([bool(joint["valid"]) for joint in joints], dtype=bool)
        matrices = np.array([joint["matrix"] for joint in joints], dtype=np.float64)
        transforms = matrices.reshape(len(names), 4, 4)
    except (TypeError, KeyError, ValueError) as error:
        raise SkeletonError(f"{path}: malformed joint entry ({error!r})") from error
    return transforms, valid, names
