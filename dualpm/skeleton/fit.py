"""Fit a rig's pose to predicted point pairs, frame by frame: node-local poses for animation and export.

    fit = fit_sequence(rig, [FrameObservation(canonical, posed, confidence), ...], method="lbs")
    fit.poses        # (F, num_nodes, 7) local [qw qx qy qz tx ty tz] per node; skinning.skin reproduces the fit
    fit.to_json()    # per frame and joint: points used, residual, status

Methods:

- `kabsch` (the reference's, the baseline): per-bone weighted Kabsch fits of the points whose skin weight
  for the joint is >= 0.5 (`dualpm.skeleton.joints.estimate_joint_transforms`), converted to node-local
  rotations and translations (translations as fitted, so bone lengths may drift). A joint without its own
  support borrows its nearest fitted ancestor's transform: status "inherited".
- `lbs` (default): the skeleton is rigid. Free are the local rotations of the joints and the translation of
  the skeleton's root joint(s); bone offsets are the rig's rest translations. All joints are solved together
  by Levenberg-Marquardt on the Huber loss of point distances (iteratively reweighted normal equations with
  an analytic Jacobian: a 3J x 3J solve per step; `scipy.optimize.least_squares` with the same Jacobian
  and loss reaches the same minimum but takes an SVD of the tall 3P x 3J Jacobian per step: 3-5x slower
  from 300 to 2000 points, see docs/benchmarks.md) against the full
  linear-blend-skinning residual `sqrt(c_i) (sum_j w_ij M_j p_i - q_i)` with the rig's real weights at every
  point, started from the Kabsch fit. A joint moves the points of its subtree; with fewer than `min_points`
  of them (subtree weight >= 0.5) its rotation is not observable and is frozen: at rest for a single frame,
  interpolated on the rotation manifold (Slerp) between the nearest frames that fitted it in a sequence
  (held at the ends): status "rest" or "interpolated". With `spread`, a Gaussian prior on the joints'
  rotations from rest, weighed by the noise the first solve leaves, keeps noisy predictions (a small
  model's) from bending weakly supported joints: exact points keep their exact fit.

Skin weights at a predicted canonical point are the nearest template vertex's (as the reference); points
farther than `MAX_DISTANCE_FRACTION` of the rig's size from every vertex are dropped as outliers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from dualpm.gltf import SkinnedMesh
from dualpm.skeleton.joints import estimate_joint_transforms, skin_weights_at
from dualpm.skeleton.kinematics import (
    RigTree,
    left_jacobian,
    quat_wxyz_to_rotation,
    rotation_to_quat_wxyz,
    skinned_points,
)
from dualpm.skeleton.rigid import SkeletonError, as_points

METHODS = ("kabsch", "lbs")
STATUSES = ("fitted", "inherited", "interpolated", "rest")
FIT_FORMAT, FIT_VERSION = "dualpm-fit", 1
MAX_DISTANCE_FRACTION = 0.2  # of the rig's rest size: farther canonical points are outliers
HUBER_FRACTION = 0.01  # of the rig's rest size: residuals beyond count linearly (Huber loss)
# The solve stops when a step lowers the cost by less than this fraction: on the benchmark's sequences
# 1e-6 instead of 1e-12 moved no error by more than 0.01% and saved 20-40% of the time (docs/benchmarks.md).
FIT_TOLERANCE = 1e-6
SUPPORT_WEIGHT = 0.5  # a point counts for a joint when its (subtree) skin weight reaches this
DEFAULT_PRIOR_DEGREES = 20.0  # pose prior of `dualpm-animate` (docs/benchmarks.md, "Pose fitting")


@dataclass(frozen=True)
class FrameObservation:
    """One frame's predicted point pairs.

    canonical: (N, 3) float32/64 rest-pose coordinates of the fitted rig (its units);
    posed: (N, 3) the same points in camera space (z minus view[2, 3]);
    confidence: (N,) float >= 0 (the predicted confidence, or 1).
    """

    canonical: np.ndarray
    posed: np.ndarray
    confidence: np.ndarray


@dataclass(frozen=True)
class JointReport:
    joint: str  # node name of the joint
    points: int  # points that moved it (kabsch: own weight >= 0.5; lbs: subtree weight >= 0.5)
    residual: float  # confidence-weighted RMS distance of its own points (weight >= 0.5), NaN if none
    status: str  # one of STATUSES


@dataclass(frozen=True)
class SequenceFit:
    poses: np.ndarray  # (F, num_nodes, 7) float64 node-local [qw qx qy qz tx ty tz]
    joints: tuple[tuple[JointReport, ...], ...]  # [frame][joint]
    method: str = "lbs"

    def to_json(self) -> dict:
        """fit.json content: `{"format", "version", "method", "frames": [{"frame", "joints": [{"joint",
        "points", "residual" (null when unknown), "status"}]}]}`, frames in fitted order."""
        frames = [
            {"frame": f, "joints": [
                {"joint": r.joint, "points": r.points,
                 "residual": float(r.residual) if np.isfinite(r.residual) else None, "status": r.status}
                for r in reports]}
            for f, reports in enumerate(self.joints)
        ]
        return {"format": FIT_FORMAT, "version": FIT_VERSION, "method": self.method, "frames": frames}


@dataclass(frozen=True, eq=False)
class _Frame:
    canonical: np.ndarray  # (P, 3) float64
    posed: np.ndarray  # (P, 3) float64
    confidence: np.ndarray  # (P,) float64, mean 1
    weights: np.ndarray  # (P, J) float64 rows summing to 1


def _prepare(rig: SkinnedMesh, index: int, frame: FrameObservation, size: float) -> _Frame:
    where = f"frame {index}"
    canonical = as_points(f"{where}: canonical points", frame.canonical)
    posed = as_points(f"{where}: posed points", frame.posed)
    confidence = np.asarray(frame.confidence, dtype=np.float64)
    if len(posed) != len(canonical) or confidence.shape != (len(canonical),):
        raise SkeletonError(f"{where}: canonical {canonical.shape}, posed {posed.shape} and confidence "
                            f"{confidence.shape} must be (N, 3), (N, 3) and (N,)")
    if not np.isfinite(confidence).all() or (confidence < 0).any():
        raise SkeletonError(f"{where}: confidences must be finite and >= 0")
    weights = skin_weights_at(canonical, rig, k=1, max_distance=MAX_DISTANCE_FRACTION * size).astype(np.float64)
    total = weights.sum(axis=1)
    keep = (total > 0) & (confidence > 0)
    if keep.sum() < 3:
        raise SkeletonError(f"{where}: {int(keep.sum())} usable point pairs (near the template, confidence "
                            "> 0); at least 3 are needed")
    conf = confidence[keep]
    # Weights as stored (rows sum to 1 up to float32 rounding), as `dualpm.skinning.skin` blends them.
    return _Frame(canonical[keep], posed[keep], conf / conf.mean(), weights[keep])


def rig_size(rig: SkinnedMesh) -> float:
    """Longest side of the rig's bind-pose bounding box (its units)."""
    vertices = np.asarray(rig.vertices, dtype=np.float64)
    return float(np.ptp(vertices, axis=0).max())


def local_pose_from_skinning(tree: RigTree, skinning: np.ndarray) -> np.ndarray:
    """(N, 7) float64 node-local pose `[qw qx qy qz tx ty tz]` whose joints' skinning matrices
    (`global @ inverse_bind`) are, as near as a TRS with the rig's rest scales can be, `skinning` (J, 4, 4);
    other nodes at rest. Rotations by polar decomposition (the nearest rotation)."""
    rest_rot = quat_wxyz_to_rotation(tree.rest[:, :4]).as_matrix()
    target = skinning @ np.linalg.inv(tree.inverse_bind)  # joint-to-world wanted, (J, 4, 4)
    joint_of = np.full(tree.num_nodes, -1)
    joint_of[tree.joint_nodes] = np.arange(tree.num_joints)
    pose = tree.rest.copy()
    world = np.zeros((tree.num_nodes, 4, 4))
    for node in tree.order:
        parent = tree.parents[node]
        parent_world = world[parent] if parent >= 0 else np.eye(4)
        if joint_of[node] >= 0:
            local = np.linalg.solve(parent_world, target[joint_of[node]])
            linear = local[:3, :3] / tree.rest_scale[node][None, :]
            u, _, vt = np.linalg.svd(linear)
            rotation = u @ np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))]) @ vt
            pose[node, :4] = rotation_to_quat_wxyz(Rotation.from_matrix(rotation))
            pose[node, 4:] = local[:3, 3]
        else:
            rotation = rest_rot[node]
        matrix = np.eye(4)
        matrix[:3, :3] = rotation * tree.rest_scale[node][None, :]
        matrix[:3, 3] = pose[node, 4:]
        world[node] = parent_world @ matrix
    return pose


class _LbsProblem:
    """Residuals and Jacobian of one frame; parameters: rotation vectors of the free joints (left
    perturbations of their rest rotations, started at the start pose's), then the translations of the
    skeleton roots. `prior` (weight per unit of squared angle, in the residual's squared units) pulls the
    free non-root joints' rotations towards rest: 0.5 prior |r|^2 is added to the cost of each."""

    def __init__(self, tree: RigTree, frame: _Frame, start: np.ndarray, free: np.ndarray, prior: float = 0.0):
        self.tree, self.frame, self.free = tree, frame, free
        self.free_nodes = tree.joint_nodes[free]
        self.roots = tree.joint_nodes[tree.skeleton_roots]
        start_rot = quat_wxyz_to_rotation(start[:, :4]).as_matrix()
        rest_rot = quat_wxyz_to_rotation(tree.rest[:, :4]).as_matrix()
        self.base_rot = start_rot.copy()  # fixed rotations for frozen joints, the rest for free ones
        self.base_rot[self.free_nodes] = rest_rot[self.free_nodes]
        self.start_rotvec = Rotation.from_matrix(
            start_rot[self.free_nodes] @ rest_rot[self.free_nodes].transpose(0, 2, 1)).as_rotvec()
        self.start_trans = start[:, 4:].copy()
        self.sqrt_conf = np.sqrt(frame.confidence)[:, None]
        self.below_free = tree.below[:, free].astype(np.float64)  # (J, Jf)
        self.subtree_free = frame.weights @ self.below_free  # (P, Jf) weight moved by each free joint
        self.subtree_roots = frame.weights @ tree.below[:, tree.skeleton_roots]  # (P, R)
        # The roots' rotations are the body's orientation in the camera: no prior on them.
        not_root = ~np.isin(self.free_nodes, self.roots)
        self.prior = np.concatenate([np.repeat(prior * not_root, 3), np.zeros(3 * len(self.roots))])
        self._cache: tuple[bytes, np.ndarray, np.ndarray] | None = None

    def x0(self) -> np.ndarray:
        return np.concatenate([self.start_rotvec.ravel(), self.start_trans[self.roots].ravel()])

    def split(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = 3 * len(self.free_nodes)
        return x[:count].reshape(-1, 3), x[count:].reshape(-1, 3)

    def state(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rotations (N, 3, 3), translations (N, 3)) of parameters x."""
        rotvec, root_trans = self.split(x)
        rotation = self.base_rot.copy()
        rotation[self.free_nodes] = Rotation.from_rotvec(rotvec).as_matrix() @ rotation[self.free_nodes]
        translation = self.start_trans.copy()
        translation[self.roots] = root_trans
        return rotation, translation

    def _world(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = x.tobytes()
        if self._cache is None or self._cache[0] != key:
            world = self.tree.world(*self.state(x))
            self._cache = (key, world, self.tree.skinning(world))
        return self._cache[1], self._cache[2]

    def residuals(self, x: np.ndarray) -> np.ndarray:
        _, skinning = self._world(x)
        moved = skinned_points(skinning, self.frame.canonical, self.frame.weights)
        return (self.sqrt_conf * (moved - self.frame.posed)).ravel()

    def jacobian(self, x: np.ndarray) -> np.ndarray:
        world, skinning = self._world(x)
        rotvec, _ = self.split(x)
        frame, tree = self.frame, self.tree
        count, num_free = len(frame.canonical), len(self.free_nodes)
        homogeneous = np.concatenate([frame.canonical, np.ones((count, 1))], axis=1)  # (P, 4)
        by_joint = (homogeneous @ skinning[:, :3, :].reshape(-1, 4).T).reshape(count, -1, 3)  # (P, J, 3)
        weighted = (frame.weights[:, :, None] * by_joint).transpose(0, 2, 1)  # (P, 3, J)
        moved = weighted @ self.below_free  # (P, 3, Jf): subtree-weighted posed point
        parents = tree.parents[self.free_nodes]
        linear = np.where((parents >= 0)[:, None, None], world[np.maximum(parents, 0), :3, :3], np.eye(3))
        origin = world[self.free_nodes, :3, 3]  # (Jf, 3) joint origins in the world
        # A rotation by a about the joint (axis in its parent's frame, L that frame's linear part) moves a
        # subtree point x by L (a x L^-1 (x - o)); summed with the skin weights over the subtree that is
        # L (a x L^-1 (z - s o)) = N ((L a) x (z - s o)), N = L L^T / det L (the identity for rotations),
        # z the subtree-weighted posed point, s the subtree weight, o the joint's origin. a = J_l(r) dr.
        arm = moved - self.subtree_free[:, None, :] * origin.T[None]  # (P, 3, Jf)
        axes = linear @ left_jacobian(rotvec)  # (Jf, 3, c): world axis of each parameter
        jac = np.empty((count, 3, 3 * (num_free + len(self.roots))))
        block = jac[:, :, : 3 * num_free].reshape(count, 3, num_free, 3)  # (P, a, Jf, c), a view
        for a, (b, d) in enumerate(((1, 2), (2, 0), (0, 1))):  # (v x w)_a = v_b w_d - v_d w_b
            block[:, a] = axes[None, :, b, :] * arm[:, d, :, None] - axes[None, :, d, :] * arm[:, b, :, None]
        stretch = linear @ linear.transpose(0, 2, 1) / np.linalg.det(linear)[:, None, None]
        if not np.allclose(stretch, np.eye(3), rtol=0.0, atol=1e-12):  # scaled or sheared parent frames
            block[:] = np.einsum("jab,pbjc->pajc", stretch, block)
        root_parents = tree.parents[self.roots]
        root_linear = np.where((root_parents >= 0)[:, None, None],
                               world[np.maximum(root_parents, 0), :3, :3], np.eye(3))  # (R, a, c)
        trans = jac[:, :, 3 * num_free :].reshape(count, 3, len(self.roots), 3)  # (P, a, R, c), a view
        trans[:] = self.subtree_roots[:, None, :, None] * root_linear.transpose(1, 0, 2)[None]
        jac = jac.reshape(3 * count, -1)
        jac *= np.repeat(self.sqrt_conf[:, 0], 3)[:, None]
        return jac


def huber_weights(distance: np.ndarray, delta: float) -> np.ndarray:
    """IRLS weights of the Huber loss on point distances (P,): 1 inside `delta`, `delta / d` beyond."""
    return np.where(distance <= delta, 1.0, delta / np.maximum(distance, 1e-300))


def huber_cost(distance: np.ndarray, delta: float) -> float:
    """Sum of the Huber loss of point distances: d^2 / 2 inside `delta`, delta (d - delta / 2) beyond."""
    return float(np.where(distance <= delta, 0.5 * distance**2, delta * (distance - 0.5 * delta)).sum())


def solve_robust(problem: _LbsProblem, delta: float, max_iterations: int = 50, tolerance: float = 1e-12
                 ) -> tuple[np.ndarray, int]:
    """Levenberg-Marquardt on the Huber loss of per-point distances, by iteratively reweighted normal
    equations (3J unknowns, so a J x J solve per step instead of an SVD of the 3P x 3J Jacobian).

    Returns the parameters and the number of iterations.
    """
    x = problem.x0()
    prior = problem.prior

    def total_cost(x: np.ndarray, residual: np.ndarray) -> float:
        return huber_cost(np.linalg.norm(residual, axis=1), delta) + 0.5 * float(prior @ x**2)

    residual = problem.residuals(x).reshape(-1, 3)
    cost = total_cost(x, residual)
    damping = 1e-6
    for iteration in range(1, max_iterations + 1):
        distance = np.linalg.norm(residual, axis=1)
        weight = np.repeat(huber_weights(distance, delta), 3)
        jac = problem.jacobian(x)
        weighted = jac * weight[:, None]
        normal = weighted.T @ jac + np.diag(prior)
        gradient = weighted.T @ residual.ravel() + prior * x
        if np.abs(gradient).max() <= tolerance * max(cost, 1e-300):
            return x, iteration
        diagonal = np.maximum(np.diag(normal), 1e-12 * max(np.diag(normal).max(), 1e-300))
        while True:
            step = np.linalg.solve(normal + damping * np.diag(diagonal), -gradient)
            trial = x + step
            trial_residual = problem.residuals(trial).reshape(-1, 3)
            trial_cost = total_cost(trial, trial_residual)
            if trial_cost <= cost:
                break
            damping *= 10.0
            if damping > 1e12:
                return x, iteration
        damping = max(damping / 10.0, 1e-9)
        converged = cost - trial_cost <= tolerance * cost or np.abs(step).max() <= 1e-12
        x, residual, cost = trial, trial_residual, trial_cost
        if converged:
            return x, iteration
    return x, max_iterations


def _subsample(frame: _Frame, max_points: int) -> _Frame:
    """At most `max_points` of the frame's points (a fixed random choice, in their order)."""
    if len(frame.canonical) <= max_points:
        return frame
    keep = np.sort(np.random.default_rng(0).choice(len(frame.canonical), max_points, replace=False))
    return _Frame(frame.canonical[keep], frame.posed[keep], frame.confidence[keep], frame.weights[keep])


def _fit_lbs(tree: RigTree, frame: _Frame, start: np.ndarray, free: np.ndarray, size: float,
             max_points: int, spread: float | None) -> np.ndarray:
    sampled = _subsample(frame, max_points)
    delta = HUBER_FRACTION * size
    problem = _LbsProblem(tree, sampled, start, free)
    x, _ = solve_robust(problem, delta, tolerance=FIT_TOLERANCE)
    if spread is not None:
        # MAP with a Gaussian prior of `spread` radians on each non-root joint's rotation from rest, the
        # points' noise variance estimated from the unregularised fit's residuals: exact points (sigma ~ 0)
        # keep their fit, noisy ones lean on the rest pose where their evidence is weak.
        rotation, translation = problem.state(x)
        refit = start.copy()
        refit[:, :4] = rotation_to_quat_wxyz(Rotation.from_matrix(rotation))
        refit[:, 4:] = translation
        distance = np.linalg.norm(problem.residuals(x).reshape(-1, 3), axis=1) / problem.sqrt_conf[:, 0]
        variance = float(np.average(np.minimum(distance, 3 * delta) ** 2, weights=sampled.confidence))
        problem = _LbsProblem(tree, sampled, refit, free, prior=variance / spread**2)
        x, _ = solve_robust(problem, delta, tolerance=FIT_TOLERANCE)
    rotation, translation = problem.state(x)
    pose = start.copy()
    pose[:, :4] = rotation_to_quat_wxyz(Rotation.from_matrix(rotation))
    pose[:, 4:] = translation
    return pose


def _own_residual(tree: RigTree, frame: _Frame, pose: np.ndarray) -> np.ndarray:
    """(J,) confidence-weighted RMS distance of each joint's own points (weight >= 0.5), NaN without any."""
    moved = skinned_points(tree.skinning(tree.pose_world(pose)), frame.canonical, frame.weights)
    squared = frame.confidence * ((moved - frame.posed) ** 2).sum(axis=1)  # (P,)
    own = (frame.weights >= SUPPORT_WEIGHT).T * frame.confidence[None]  # (J, P)
    total = own.sum(axis=1)
    return np.sqrt(np.divide(own @ (squared / frame.confidence), total, out=np.full(len(total), np.nan),
                             where=total > 0))


def _interpolate_frozen(tree: RigTree, poses: np.ndarray, frozen: np.ndarray) -> np.ndarray:
    """Statuses (F, J) of frozen joints ("interpolated"/"rest"), rotations filled in place on `poses`."""
    status = np.where(frozen, "rest", "fitted").astype(object)
    frames = np.arange(len(poses))
    for j, node in enumerate(tree.joint_nodes):
        known = np.flatnonzero(~frozen[:, j])
        todo = np.flatnonzero(frozen[:, j])
        if not len(todo) or not len(known):
            continue  # never fitted: every frame keeps the rest rotation
        rotations = quat_wxyz_to_rotation(poses[known, node, :4])
        if len(known) == 1:
            filled = quat_wxyz_to_rotation(np.repeat(poses[known, node, :4], len(todo), axis=0))
        else:
            filled = Slerp(known, rotations)(np.clip(frames[todo], known[0], known[-1]))
        poses[todo, node, :4] = rotation_to_quat_wxyz(filled)
        status[todo, j] = "interpolated"
    return status


def fit_sequence(
    rig: SkinnedMesh, frames: Sequence[FrameObservation], *, method: str = "lbs", min_points: int = 3,
    max_points: int = 2000, spread: float | None = None,
) -> SequenceFit:
    """Fit the rig's node-local pose to every frame's point pairs (see the module doc for the methods).

    Args:
        rig: the template the canonical points refer to (its units; a synth dataset's scaled rig).
        frames: F observations in time order (a single image is a sequence of one).
        method: "lbs" (rigid skeleton, full skinning residual) or "kabsch" (per-bone fits, the reference).
        min_points: fewest supporting points for a joint's own fit (>= 3).
        max_points: "lbs" solves with at most this many of a frame's points (a fixed random subset; the
            Kabsch start and the reported residuals use all).
        spread: "lbs": radians; None: no prior. Otherwise the fit is solved twice: unregularised, then as
            the maximum a posteriori pose under a Gaussian prior of this spread on every non-root joint's
            rotation from rest, with the points' noise variance taken from the first fit's residuals.
    Returns:
        `SequenceFit` with poses (F, num_nodes, 7) float64 and one `JointReport` per frame and joint.
    Raises:
        SkeletonError naming the frame when its arrays are malformed or it has fewer than 3 usable points.
    """
    if method not in METHODS:
        raise SkeletonError(f"fit_sequence: method must be one of {', '.join(METHODS)}, got {method!r}")
    if spread is not None and not spread > 0:
        raise SkeletonError(f"fit_sequence: spread must be > 0 radians or None, got {spread}")
    if min_points < 3 or max_points < 3:
        raise SkeletonError(f"fit_sequence: min_points and max_points must be at least 3, got {min_points}, "
                            f"{max_points}")
    if rig.num_joints == 0:
        raise SkeletonError(f"{rig.source or rig.name}: the rig has no skin joints to fit")
    tree, size = RigTree.of(rig), rig_size(rig)
    prepared = [_prepare(rig, i, frame, size) for i, frame in enumerate(frames)]
    names = [rig.node_names[n] or f"joint{j}" for j, n in enumerate(tree.joint_nodes)]
    poses = np.zeros((len(prepared), tree.num_nodes, 7))
    counts = np.zeros((len(prepared), tree.num_joints), dtype=np.int64)
    frozen = np.zeros((len(prepared), tree.num_joints), dtype=bool)
    inherited = np.zeros_like(frozen)
    for f, frame in enumerate(prepared):
        kabsch = estimate_joint_transforms(frame.canonical, frame.posed, frame.weights, min_weight=SUPPORT_WEIGHT,
                                           min_points=min_points, parents=tree.joint_parent)
        start = local_pose_from_skinning(tree, kabsch.transforms)
        if method == "kabsch":
            poses[f] = start
            counts[f] = (frame.weights >= SUPPORT_WEIGHT).sum(axis=0)
            inherited[f] = ~kabsch.valid
            continue
        counts[f] = ((frame.weights @ tree.below) >= SUPPORT_WEIGHT).sum(axis=0)
        frozen[f] = counts[f] < min_points
        start[:, 4:] = tree.rest[:, 4:]  # rigid skeleton: the rig's bone offsets ...
        roots = tree.joint_nodes[tree.skeleton_roots]
        start[roots, 4:] = local_pose_from_skinning(tree, kabsch.transforms)[roots, 4:]  # ... but the root's place
        start[tree.joint_nodes[frozen[f]], :4] = tree.rest[tree.joint_nodes[frozen[f]], :4]
        poses[f] = _fit_lbs(tree, frame, start, ~frozen[f], size, max_points, spread)
    if method == "kabsch":
        status = np.where(inherited, "inherited", "fitted")
    else:
        status = _interpolate_frozen(tree, poses, frozen)
    reports = []
    for f, frame in enumerate(prepared):
        residual = _own_residual(tree, frame, poses[f])
        reports.append(tuple(JointReport(names[j], int(counts[f, j]), float(residual[j]), str(status[f, j]))
                             for j in range(tree.num_joints)))
    return SequenceFit(poses=poses, joints=tuple(reports), method=method)
