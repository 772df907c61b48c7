"""Poses and cameras from predicted point pairs, for the exporters (numpy).

`fit_frames` is the ONE place where `dualpm-animate` turns predictions into poses. Method "kabsch" runs
the per-bone Kabsch fit of `dualpm.eval.skeleton` on each frame and converts the joint transforms
(canonical -> posed, i.e. `global @ inverse_bind`) into node-local TRS poses; any other method is handed
to `dualpm.skeleton.fit.fit_sequence` (issue 23's skeleton package, imported only then).

`estimate_cameras` recovers what the depth-subtracted posed points do not say directly: the focal length
(shared by all frames) and each frame's camera distance `view[2, 3]`, by linear least squares on the
projection of every kept point onto its own pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from dualpm.camera import SENSOR_HEIGHT_MM
from dualpm.errors import ConfigError, DatasetError
from dualpm.skeleton.joints import estimate_joint_transforms, joint_parents, skin_weights_at
from dualpm.gltf import SkinnedMesh, node_depths

FIT_METHOD = "kabsch"  # dualpm.eval.skeleton's per-bone fit (the reference's method)
MAX_DISTANCE = 0.2  # points farther than this fraction of the rig's size from every vertex get no weights


@dataclass(frozen=True)
class Observation:
    """One frame's kept points (see `dualpm.predictions.kept_points`).

    canonical, posed: (N, 3) float, rest-pose coordinates of the fitted rig and camera space (z minus
    view[2, 3]), scene units. confidence: (N,) float >= 0. pixels: (N, 2) float NDC `(x, y)` of each
    point's pixel centre (y down, as `dualpm.camera`), or None when unknown.
    """

    canonical: np.ndarray
    posed: np.ndarray
    confidence: np.ndarray
    pixels: np.ndarray | None = None


@dataclass(frozen=True)
class FrameFit:
    """Fitted poses of F frames: `poses` (F, num_nodes, 7) float64 node-local `[qw qx qy qz tx ty tz]`
    in the fitted rig's units; `joints[f][j]` = {"joint", "points", "residual", "status"}."""

    poses: np.ndarray
    joints: tuple[tuple[dict, ...], ...]
    method: str = "kabsch"

    def to_json(self, ids: Sequence[str]) -> dict:
        frames = [{"id": i, "joints": list(j)} for i, j in zip(ids, self.joints, strict=True)]
        return {"method": self.method, "frames": frames}


def fit_frames(rig: SkinnedMesh, frames: Sequence[Observation], min_points: int = 3,
               ids: Sequence[str] | None = None, method: str = FIT_METHOD) -> FrameFit:
    """Fit every frame's pose.

    Args:
        rig: the skinned mesh the predictions' canonical coordinates belong to (scene units).
        frames: F observations.
        min_points: fewest points (skin weight >= 0.5) for a joint's own fit; others inherit.
        ids: frame names for messages (default: their indices).
        method: "kabsch" (per-bone Kabsch of `dualpm.eval.skeleton` converted to local TRS, here), or a
            method of `dualpm.skeleton.fit.fit_sequence` ("lbs": the rigid-skeleton fit of issue 23), which
            is imported only then.
    Returns:
        `FrameFit`; joint status "fitted" or "inherited" (nearest fitted ancestor, or the global fit), or
        as `fit_sequence` reports it.
    """
    size = float(np.ptp(rig.vertices, axis=0).max())
    weights = []
    for index, frame in enumerate(frames):
        name = ids[index] if ids is not None else str(index)
        if len(frame.canonical) < 3:
            raise DatasetError(f"frame {name}: {len(frame.canonical)} kept points, too few to fit a pose")
        weights.append(skin_weights_at(frame.canonical, rig, max_distance=MAX_DISTANCE * size))
        off = float((weights[-1].sum(axis=1) == 0).mean())
        if off > 0.5:
            raise DatasetError(
                f"frame {name}: {off:.0%} of the predicted canonical points lie farther than "
                f"{MAX_DISTANCE:.0%} of the rig's size from {rig.source or rig.name}: not the rig (or the "
                "units) the model predicts for; check --rig and --mesh-scale"
            )
    if method != FIT_METHOD:
        return _fit_sequence(rig, frames, min_points, method)
    parents = joint_parents(rig)
    transforms, joints = [], []
    for frame, frame_weights in zip(frames, weights, strict=True):
        fit = estimate_joint_transforms(frame.canonical, frame.posed, frame_weights, min_points=min_points,
                                        parents=parents)
        counts = (frame_weights >= 0.5).sum(axis=0)
        transforms.append(fit.transforms)
        joints.append(tuple(
            {"joint": rig.node_names[node] or f"node{node}", "points": int(n),
             "residual": float(r) if ok else None, "status": "fitted" if ok else "inherited"}
            for node, n, r, ok in zip(rig.joint_nodes, counts, fit.residual, fit.valid, strict=True)
        ))
    return FrameFit(poses_from_joint_transforms(rig, np.stack(transforms)), tuple(joints))


def _fit_sequence(rig: SkinnedMesh, frames: Sequence[Observation], min_points: int, method: str) -> FrameFit:
    """`dualpm.skeleton.fit.fit_sequence` (issue 23's skeleton package) as a `FrameFit`."""
    try:
        from dualpm.skeleton.fit import FrameObservation, fit_sequence
    except ImportError as err:
        raise ConfigError(f"fit method {method!r} needs dualpm.skeleton.fit, which this installation lacks "
                          f"({err}); use {FIT_METHOD!r}") from err
    observed = [FrameObservation(f.canonical, f.posed, f.confidence) for f in frames]
    fit = fit_sequence(rig, observed, method=method, min_points=min_points)
    joints = tuple(
        tuple({"joint": r.joint, "points": int(r.points),
               "residual": float(r.residual) if np.isfinite(r.residual) else None, "status": r.status}
              for r in frame)
        for frame in fit.joints
    )
    return FrameFit(np.asarray(fit.poses, dtype=np.float64), joints, method)


def poses_from_joint_transforms(rig: SkinnedMesh, transforms: np.ndarray) -> np.ndarray:
    """Node-local poses whose skinning matrices are (as near as a TRS can be) the given ones.

    Args:
        rig: the skinned mesh (its rest TRS, parents, joints, inverse binds).
        transforms: (F, J, 4, 4) float joint transforms `global[joint_node] @ inverse_bind`.
    Returns:
        (F, N, 7) float64 `[qw qx qy qz tx ty tz]`; nodes that are not joints keep their rest TRS, joint
        rotations are the nearest rotations to `local @ S(rest scale)^-1` (polar decomposition).
    """
    transforms = np.asarray(transforms, dtype=np.float64)
    frames, num_nodes = len(transforms), rig.num_nodes
    joint_of = np.full(num_nodes, -1)
    joint_of[rig.joint_nodes] = np.arange(rig.num_joints)
    wanted = transforms @ np.linalg.inv(rig.inverse_bind.astype(np.float64))  # (F, J, 4, 4) joint globals
    rest = _trs(rig.rest_translation, rig.rest_rotation, rig.rest_scale)  # (N, 4, 4)
    local = np.broadcast_to(rest, (frames, num_nodes, 4, 4)).copy()
    world = local.copy()
    depth = node_depths(rig.parents)
    for level in range(int(depth.max()) + 1):  # parents first
        nodes = np.flatnonzero(depth == level)
        par = rig.parents[nodes]
        parent_world = np.where((par >= 0)[None, :, None, None], world[:, np.maximum(par, 0)], np.eye(4))
        joints = joint_of[nodes] >= 0
        if joints.any():
            n = nodes[joints]
            local[:, n] = np.linalg.inv(parent_world[:, joints]) @ wanted[:, joint_of[n]]
        world[:, nodes] = parent_world @ local[:, nodes]
    linear = local[..., :3, :3] / rig.rest_scale.astype(np.float64)[None, :, None, :]  # undo S: columns
    u, _, vt = np.linalg.svd(linear)
    flip = np.linalg.det(u @ vt) < 0
    u[flip, :, 2] *= -1
    quat = Rotation.from_matrix((u @ vt).reshape(-1, 3, 3)).as_quat().reshape(frames, num_nodes, 4)
    poses = np.concatenate([np.roll(quat, 1, axis=-1), local[..., :3, 3]], axis=-1)
    is_joint = joint_of >= 0
    poses[:, ~is_joint, :4] = rig.rest_rotation[~is_joint]  # exact rest values for the other nodes
    return poses


def _trs(translation: np.ndarray, rotation_wxyz: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, 4, 4) float64 `T @ R @ S` from (N, 3), (N, 4) real-first, (N, 3)."""
    m = np.zeros((len(translation), 4, 4))
    rot = Rotation.from_quat(np.roll(np.asarray(rotation_wxyz, dtype=np.float64), -1, axis=-1)).as_matrix()
    m[:, :3, :3] = rot * np.asarray(scale, dtype=np.float64)[:, None, :]
    m[:, :3, 3] = translation
    m[:, 3, 3] = 1.0
    return m


@dataclass(frozen=True)
class CameraTrack:
    """The cameras of F frames: `focal_mm` (F,) float64 focal lengths (36 mm sensor height), `aspect` (width /
    height) and `depth` (F,) float64 = `view[2, 3]` of each frame (negative: the object lies in front of the
    camera), scene units of the fitted rig. Camera f looks down -Z from (0, 0, -depth[f]) in the posed
    points' frame."""

    focal_mm: np.ndarray
    aspect: float
    depth: np.ndarray


def estimate_cameras(frames: Sequence[Observation], aspect: float,
                     focal_mm: float | Sequence[float] | str = "shared") -> CameraTrack:
    """Focal lengths (unless given) and per-frame camera distance from where the posed points project.

    A kept point (x, y, z') of pixel (u, v) (NDC) satisfies, with c = cot(fov_y / 2) and d = view[2, 3]:
    `-u z' = c x / aspect + u d` and `v z' = c y - v d`; both are linear in c and d, solved by least squares
    (normal equations, O(points) memory).

    Args:
        frames: F observations with `pixels`.
        aspect: image width / height.
        focal_mm: "shared" (one focal length for all frames, a video's), "per-frame" (one each), a number
            or F numbers (known focal lengths: only the distances are solved).
    """
    rows = []
    for index, frame in enumerate(frames):
        if frame.pixels is None:
            raise DatasetError(f"frame {index}: no pixel positions, cannot place the camera")
        p = frame.posed.astype(np.float64)
        u, v = frame.pixels[:, 0].astype(np.float64), frame.pixels[:, 1].astype(np.float64)
        b = np.concatenate([p[:, 0] / aspect, p[:, 1]])  # coefficient of c
        c = np.concatenate([u, -v])  # coefficient of d
        a = np.concatenate([-u * p[:, 2], v * p[:, 2]])  # right-hand side
        rows.append((b @ b, b @ c, c @ c, b @ a, c @ a))
    sbb, sbc, scc, sba, sca = (np.array(x) for x in zip(*rows, strict=True))
    if (scc <= 0).any():
        raise DatasetError("cannot place the camera: a frame has no points off the image centre")
    if isinstance(focal_mm, str):
        if focal_mm == "shared":  # eliminate each d_f = (sca - c sbc) / scc, then solve for the one c
            shared = (sba.sum() - (sbc * sca / scc).sum()) / (sbb.sum() - (sbc**2 / scc).sum())
            cot = np.full(len(frames), shared)
        elif focal_mm == "per-frame":
            cot = (sba * scc - sbc * sca) / (sbb * scc - sbc**2)
        else:
            raise ValueError(f"focal_mm: unknown mode {focal_mm!r}")
        focal = cot * SENSOR_HEIGHT_MM / 2.0
    else:
        focal = np.broadcast_to(np.asarray(focal_mm, dtype=np.float64), (len(frames),)).copy()
        cot = 2.0 * focal / SENSOR_HEIGHT_MM
    depth = (sca - cot * sbc) / scc
    usable = np.isfinite(focal).all() and (focal > 0).all() and np.isfinite(depth).all() and (depth < 0).all()
    if not usable:
        raise DatasetError(
            f"cannot place the camera: the predictions give focal lengths {np.nanmin(focal):.4g}.."
            f"{np.nanmax(focal):.4g} mm and camera depths {np.nanmin(depth):.4g}..{np.nanmax(depth):.4g} "
            "(expected > 0 and < 0); pass --focal-length"
        )
    return CameraTrack(focal, float(aspect), depth)
