"""Smoothing of fitted pose sequences on the rotation manifold, and their jitter.

Poses are `(F, num_nodes, 7)` node-local `[qw qx qy qz tx ty tz]` (see `dualpm.skeleton.fit`). Only the
skin joints are filtered: their local rotations on SO(3), their local translations (the root's motion; the
other joints' are constant for the rigid fit) as vectors. Other nodes are returned as they are.

- `savgol`: Savitzky-Golay (window `SAVGOL_SECONDS`, at least 5 frames, odd; quadratic) in the tangent
  space at each frame: `R_t <- R_t exp(sum_k c_k log(R_t^-1 R_{t+k}))`, the coefficients from
  `scipy.signal.savgol_coeffs` (edge windows fitted as `savgol_filter(mode="interp")` does). A rotation at
  constant angular velocity is a straight line in that tangent space and is left unchanged.
- `oneeuro`: the 1-euro filter (Casiez et al., CHI 2012: a low-pass whose cut-off rises with speed) with
  each step a geodesic interpolation, `x_t = x_{t-1} exp(alpha log(x_{t-1}^-1 R_t))`; run forwards and then
  backwards over the result (zero phase, as `scipy.signal.filtfilt`), so constant angular velocity is kept
  once the start-up transient (geometric in the frames from either end) has died out.
- `none`: the poses unchanged.

Quaternion components are never filtered directly (their sign and normalisation make that wrong).
"""

from __future__ import annotations

import numpy as np
from scipy.signal import savgol_coeffs, savgol_filter
from scipy.spatial.transform import Rotation, Slerp

from dualpm.gltf import SkinnedMesh
from dualpm.skeleton.kinematics import RigTree, quat_wxyz_to_rotation, rotation_to_quat_wxyz
from dualpm.skeleton.rigid import SkeletonError

SMOOTH_METHODS = ("none", "oneeuro", "savgol")
SAVGOL_SECONDS = 0.3  # window length
SAVGOL_ORDER = 2
ONE_EURO_MIN_CUTOFF = 5.0  # Hz, the cut-off at rest
ONE_EURO_BETA = 1.0  # cut-off increase per unit of speed (rad/s; translations: rig sizes per second)
ONE_EURO_DERIVATIVE_CUTOFF = 1.0  # Hz


def fill_frames(poses: np.ndarray, known: np.ndarray, count: int) -> np.ndarray:
    """(count, N, 7) poses of every frame from the poses (K, N, 7) of frames `known` (K,) (strictly
    increasing indices in [0, count)): node rotations interpolated on the rotation manifold (Slerp),
    translations linearly, frames before the first / after the last known one held.
    """
    poses = np.asarray(poses, dtype=np.float64)
    known = np.asarray(known, dtype=np.int64)
    if len(known) == 0 or len(known) != len(poses) or (np.diff(known) <= 0).any():
        raise SkeletonError(f"fill_frames: {len(poses)} poses for known frames {known.tolist()}")
    times = np.clip(np.arange(count), known[0], known[-1])
    out = np.empty((count,) + poses.shape[1:])
    for c in range(4, 7):
        out[:, :, c] = np.stack([np.interp(times, known, poses[:, n, c]) for n in range(poses.shape[1])], axis=1)
    for node in range(poses.shape[1]):
        rotations = quat_wxyz_to_rotation(poses[:, node, :4])
        if len(known) == 1:
            out[:, node, :4] = poses[0, node, :4]
        else:
            out[:, node, :4] = rotation_to_quat_wxyz(Slerp(known, rotations)(times))
    return out


def _checked(rig: SkinnedMesh, poses: np.ndarray, fps: float) -> np.ndarray:
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (rig.num_nodes, 7) or not np.isfinite(poses).all():
        raise SkeletonError(f"{rig.source or rig.name}: poses must be finite (F, {rig.num_nodes}, 7), "
                            f"got {poses.shape}")
    if not (np.isfinite(fps) and fps > 0):
        raise SkeletonError(f"fps must be a positive number, got {fps}")
    return poses


def _savgol_window(frames: int, fps: float) -> int:
    window = max(5, int(round(SAVGOL_SECONDS * fps)) | 1)
    return min(window, frames if frames % 2 else frames - 1)


def _savgol_rotations(rotations: Rotation, window: int) -> Rotation:
    """Savitzky-Golay of F rotations (one joint; a SciPy stack of F) in each frame's tangent space."""
    frames = len(rotations)
    out = []
    for t in range(frames):
        start = min(max(t - window // 2, 0), frames - window)
        coeffs = savgol_coeffs(window, SAVGOL_ORDER, pos=t - start, use="dot")
        offsets = (rotations[t].inv() * rotations[start : start + window]).as_rotvec()  # (w, 3)
        out.append(rotations[t] * Rotation.from_rotvec(coeffs @ offsets))
    return Rotation.concatenate(out)


def _alpha(cutoff: np.ndarray, fps: float) -> np.ndarray:
    return 1.0 / (1.0 + fps / (2.0 * np.pi * cutoff))


def _one_euro_pass_rotations(rotations: list[Rotation], fps: float) -> list[Rotation]:
    """One causal 1-euro pass over F frames of J rotations each (a list of SciPy stacks of J)."""
    state = rotations[0]
    speed = np.zeros(len(state))
    alpha_d = _alpha(np.array(ONE_EURO_DERIVATIVE_CUTOFF), fps)
    out = [state]
    for current in rotations[1:]:
        step = (state.inv() * current).as_rotvec()  # (J, 3)
        speed = speed + alpha_d * (np.linalg.norm(step, axis=1) * fps - speed)
        alpha = _alpha(ONE_EURO_MIN_CUTOFF + ONE_EURO_BETA * speed, fps)
        state = state * Rotation.from_rotvec(alpha[:, None] * step)
        out.append(state)
    return out


def _one_euro_pass_vectors(values: np.ndarray, fps: float, unit: float) -> np.ndarray:
    """One causal 1-euro pass over (F, J, 3) vectors; speeds measured in `unit`s per second."""
    state = values[0].copy()
    speed = np.zeros(values.shape[1])
    alpha_d = _alpha(np.array(ONE_EURO_DERIVATIVE_CUTOFF), fps)
    out = [state.copy()]
    for current in values[1:]:
        step = current - state
        speed = speed + alpha_d * (np.linalg.norm(step, axis=1) / unit * fps - speed)
        alpha = _alpha(ONE_EURO_MIN_CUTOFF + ONE_EURO_BETA * speed, fps)
        state = state + alpha[:, None] * step
        out.append(state.copy())
    return np.stack(out)


def smooth_poses(rig: SkinnedMesh, poses: np.ndarray, fps: float, method: str) -> np.ndarray:
    """Filter a pose sequence on the rotation manifold (see the module doc).

    Args:
        rig: the rig the poses belong to (its skin joints are filtered).
        poses: (F, num_nodes, 7) float node-local poses, frames in time order.
        fps: frames per second (sets the filters' time scales).
        method: "none", "oneeuro" or "savgol".
    Returns:
        (F, num_nodes, 7) float64 smoothed poses (quaternions w >= 0).
    """
    poses = _checked(rig, poses, fps)
    if method not in SMOOTH_METHODS:
        raise SkeletonError(f"smooth: method must be one of {', '.join(SMOOTH_METHODS)}, got {method!r}")
    out = poses.copy()
    frames = len(poses)
    if method == "none" or frames < 3:
        return out
    nodes = np.asarray(rig.joint_nodes)
    translations = poses[:, nodes, 4:]  # (F, J, 3)
    if method == "savgol":
        window = _savgol_window(frames, fps)
        if window <= SAVGOL_ORDER:
            return out
        for node in nodes:
            smoothed = _savgol_rotations(quat_wxyz_to_rotation(poses[:, node, :4]), window)
            out[:, node, :4] = rotation_to_quat_wxyz(smoothed)
        out[:, nodes, 4:] = savgol_filter(translations, window, SAVGOL_ORDER, axis=0, mode="interp")
        return out
    stacks = [quat_wxyz_to_rotation(poses[f, nodes, :4]) for f in range(frames)]
    forward = _one_euro_pass_rotations(stacks, fps)
    both = _one_euro_pass_rotations(forward[::-1], fps)[::-1]
    out[:, nodes, :4] = np.stack([rotation_to_quat_wxyz(r) for r in both])
    unit = max(float(np.ptp(np.asarray(rig.vertices, dtype=np.float64), axis=0).max()), 1e-12)
    forward_t = _one_euro_pass_vectors(translations, fps, unit)
    out[:, nodes, 4:] = _one_euro_pass_vectors(forward_t[::-1], fps, unit)[::-1]
    return out


def joint_positions(rig: SkinnedMesh, poses: np.ndarray) -> np.ndarray:
    """(F, J, 3) float64 world (camera) positions of the skin joints' origins for (F, N, 7) poses."""
    tree = RigTree.of(rig)
    poses = np.asarray(poses, dtype=np.float64)
    return np.stack([tree.pose_world(pose)[tree.joint_nodes, :3, 3] for pose in poses])


def jitter(rig: SkinnedMesh, poses: np.ndarray, fps: float) -> float:
    """Mean joint acceleration: the mean over frames 1..F-2 and joints of `|p[t+1] - 2 p[t] + p[t-1]| fps^2`,
    p the joints' world positions (units of the poses per s^2). NaN for fewer than 3 frames."""
    poses = _checked(rig, poses, fps)
    if len(poses) < 3:
        return float("nan")
    positions = joint_positions(rig, poses)
    acceleration = (positions[2:] - 2.0 * positions[1:-1] + positions[:-2]) * fps**2
    return float(np.linalg.norm(acceleration, axis=2).mean())
