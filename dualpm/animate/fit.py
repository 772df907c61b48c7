"""Poses and cameras from predicted point pairs, for the exporters (numpy).

`fit_frames` is the ONE place where `dualpm-animate` turns predictions into poses: it checks that the
predicted canonical points lie on the rig (else the wrong rig or units were given), then fits every frame
with `dualpm.skeleton.fit.fit_sequence` ("lbs": the rigid skeleton against the full skinning residual;
"kabsch": the reference's per-bone fit).

`estimate_cameras` recovers what the depth-subtracted posed points do not say directly: the focal length
(shared by all frames) and each frame's camera distance `view[2, 3]`, by linear least squares on the
projection of every kept point onto its own pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dualpm.camera import SENSOR_HEIGHT_MM
from dualpm.errors import DatasetError
from dualpm.gltf import SkinnedMesh
from dualpm.skeleton.fit import DEFAULT_PRIOR_DEGREES, METHODS, FrameObservation, fit_sequence
from dualpm.skeleton.joints import skin_weights_at

FIT_METHOD = "lbs"  # the rigid-skeleton fit (dualpm.skeleton.fit); "kabsch" is the reference's per-bone fit
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
    method: str = FIT_METHOD

    def to_json(self, ids: Sequence[str]) -> dict:
        frames = [{"id": i, "joints": list(j)} for i, j in zip(ids, self.joints, strict=True)]
        return {"method": self.method, "frames": frames}


def fit_frames(rig: SkinnedMesh, frames: Sequence[Observation], min_points: int = 3,
               ids: Sequence[str] | None = None, method: str = FIT_METHOD,
               prior_degrees: float = DEFAULT_PRIOR_DEGREES) -> FrameFit:
    """Fit every frame's pose.

    Args:
        rig: the skinned mesh the predictions' canonical coordinates belong to (scene units).
        frames: F observations, in time order.
        min_points: fewest supporting points for a joint's own fit.
        ids: frame names for messages (default: their indices).
        method: one of `dualpm.skeleton.fit.METHODS` ("lbs", "kabsch").
        prior_degrees: "lbs": spread of the pose prior (each non-root joint's rotation from rest), degrees;
            0: none (see `fit_sequence`'s `spread`).
    Returns:
        `FrameFit`; joint status as `fit_sequence` reports it ("fitted", "inherited", "interpolated",
        "rest"), residual None where the joint had no points of its own.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    size = float(np.ptp(rig.vertices, axis=0).max())
    for index, frame in enumerate(frames):
        name = ids[index] if ids is not None else str(index)
        if len(frame.canonical) < 3:
            raise DatasetError(f"frame {name}: {len(frame.canonical)} kept points, too few to fit a pose")
        weights = skin_weights_at(frame.canonical, rig, max_distance=MAX_DISTANCE * size)
        off = float((weights.sum(axis=1) == 0).mean())
        if off > 0.5:
            raise DatasetError(
                f"frame {name}: {off:.0%} of the predicted canonical points lie farther than "
                f"{MAX_DISTANCE:.0%} of the rig's size from {rig.source or rig.name}: not the rig (or the "
                "units) the model predicts for; check --rig and --mesh-scale"
            )
    observed = [FrameObservation(f.canonical, f.posed, f.confidence) for f in frames]
    spread = np.radians(prior_degrees) if prior_degrees > 0 else None
    fit = fit_sequence(rig, observed, method=method, min_points=min_points, spread=spread)
    joints = tuple(
        tuple({"joint": r.joint, "points": int(r.points),
               "residual": float(r.residual) if r.points and np.isfinite(r.residual) else None, "status": r.status}
              for r in frame)
        for frame in fit.joints
    )
    return FrameFit(np.asarray(fit.poses, dtype=np.float64), joints, method)


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
