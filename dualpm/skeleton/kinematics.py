"""Forward kinematics of one rig in NumPy (float64), for the fits: node-local rotations and translations in,
node-to-world and skinning matrices out, plus the tree facts the fit's Jacobian needs.

Same conventions as `dualpm.skinning` (which is torch and batched): a pose is `[qw, qx, qy, qz, tx, ty, tz]`
per node (real-first quaternion), `local = T(t) @ R(q) @ S(rest scale)`, `world = world[parent] @ local`,
skinning matrix of joint j = `world[joint_nodes[j]] @ inverse_bind[j]`. Here one pose at a time and cheap
per call (tens of nodes), because a least-squares fit evaluates it many times.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from dualpm.gltf import SkinnedMesh, node_depths
from dualpm.skeleton.rigid import SkeletonError


def quat_wxyz_to_rotation(quat: np.ndarray) -> Rotation:
    """SciPy rotations of (..., 4) real-first quaternions (normalised by SciPy)."""
    return Rotation.from_quat(np.roll(np.asarray(quat, dtype=np.float64), -1, axis=-1))


def rotation_to_quat_wxyz(rotation: Rotation) -> np.ndarray:
    """(..., 4) float64 real-first quaternions with w >= 0 of SciPy rotations."""
    quat = np.roll(rotation.as_quat(), 1, axis=-1)
    return np.where(quat[..., :1] < 0, -quat, quat)


@dataclass(frozen=True, eq=False)
class RigTree:
    """What the fits need of a `SkinnedMesh`, in float64. N nodes, J joints.

    Build with `RigTree.of(mesh)`.
    """

    parents: np.ndarray  # (N,) int64, -1 for roots
    order: np.ndarray  # (N,) int64 node indices, parents before children
    rest: np.ndarray  # (N, 7) float64 rest pose [qw qx qy qz tx ty tz]
    rest_scale: np.ndarray  # (N, 3) float64
    joint_nodes: np.ndarray  # (J,) int64
    inverse_bind: np.ndarray  # (J, 4, 4) float64
    joint_parent: np.ndarray  # (J,) int64 nearest joint ancestor, -1 if none
    below: np.ndarray  # (J, J) bool: below[k, j] = joint k is joint j or a descendant of it
    skeleton_roots: np.ndarray  # (R,) int64 joints with no joint above them (their translation is free)

    @classmethod
    def of(cls, mesh: SkinnedMesh) -> RigTree:
        parents = np.asarray(mesh.parents, dtype=np.int64)
        depth = node_depths(parents)
        joint_nodes = np.asarray(mesh.joint_nodes, dtype=np.int64)
        node_to_joint = np.full(len(parents), -1, dtype=np.int64)
        node_to_joint[joint_nodes] = np.arange(len(joint_nodes))
        joint_parent = np.full(len(joint_nodes), -1, dtype=np.int64)
        below = np.eye(len(joint_nodes), dtype=bool)
        for k, node in enumerate(joint_nodes):
            p = parents[node]
            while p >= 0:
                j = node_to_joint[p]
                if j >= 0:
                    below[k, j] = True
                    if joint_parent[k] < 0:
                        joint_parent[k] = j
                p = parents[p]
        rest = np.concatenate([mesh.rest_rotation, mesh.rest_translation], axis=1).astype(np.float64)
        return cls(
            parents=parents, order=np.argsort(depth, kind="stable"), rest=rest,
            rest_scale=np.asarray(mesh.rest_scale, dtype=np.float64), joint_nodes=joint_nodes,
            inverse_bind=np.asarray(mesh.inverse_bind, dtype=np.float64), joint_parent=joint_parent,
            below=below, skeleton_roots=np.flatnonzero(joint_parent < 0),
        )

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def num_joints(self) -> int:
        return len(self.joint_nodes)

    def world(self, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
        """Node-to-world transforms.

        Args:
            rotation: (N, 3, 3) float64 local rotation matrices; translation: (N, 3) float64 local
                translations (scene units). Scales are the rest scales.
        Returns:
            (N, 4, 4) float64.
        """
        local = np.zeros((self.num_nodes, 4, 4))
        local[:, :3, :3] = rotation * self.rest_scale[:, None, :]
        local[:, :3, 3] = translation
        local[:, 3, 3] = 1.0
        world = local.copy()
        for node in self.order:
            parent = self.parents[node]
            if parent >= 0:
                world[node] = world[parent] @ local[node]
        return world

    def pose_world(self, pose: np.ndarray) -> np.ndarray:
        """(N, 4, 4) node-to-world transforms of a (N, 7) pose."""
        pose = self.checked_pose(pose)
        return self.world(quat_wxyz_to_rotation(pose[:, :4]).as_matrix(), pose[:, 4:])

    def skinning(self, world: np.ndarray) -> np.ndarray:
        """(J, 4, 4) skinning matrices (bind pose -> posed) from (N, 4, 4) node-to-world transforms."""
        return world[self.joint_nodes] @ self.inverse_bind

    def checked_pose(self, pose: np.ndarray) -> np.ndarray:
        pose = np.asarray(pose, dtype=np.float64)
        if pose.shape != (self.num_nodes, 7) or not np.isfinite(pose).all():
            raise SkeletonError(f"pose must be finite ({self.num_nodes}, 7), got {pose.shape}")
        return pose


def skinned_points(
    skinning: np.ndarray, points: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Linear-blend skinning of canonical points with dense weights.

    Args:
        skinning: (J, 4, 4) float64 skinning matrices; points: (P, 3) float64 canonical points;
        weights: (P, J) float64 skin weights (rows summing to 1).
    Returns:
        (P, 3) float64 posed points.
    """
    blended = weights @ skinning[:, :3, :].reshape(len(skinning), 12)  # (P, 12)
    blended = blended.reshape(-1, 3, 4)
    return np.einsum("pab,pb->pa", blended[:, :, :3], points) + blended[:, :, 3]


def left_jacobian(rotvec: np.ndarray) -> np.ndarray:
    """(..., 3, 3) left Jacobian of SO(3) at rotation vectors (..., 3): d exp(r) = [J_l(r) dr]^ exp(r)."""
    rotvec = np.asarray(rotvec, dtype=np.float64)
    angle = np.linalg.norm(rotvec, axis=-1)[..., None, None]
    skew = cross_matrix(rotvec)
    small = angle < 1e-6
    safe = np.where(small, 1.0, angle)
    a = np.where(small, 0.5 - angle**2 / 24.0, (1.0 - np.cos(safe)) / safe**2)
    b = np.where(small, 1.0 / 6.0 - angle**2 / 120.0, (safe - np.sin(safe)) / safe**3)
    return np.eye(3) + a * skew + b * (skew @ skew)


def cross_matrix(v: np.ndarray) -> np.ndarray:
    """(..., 3, 3) matrices [v]_x with [v]_x u = v x u, of vectors (..., 3)."""
    v = np.asarray(v, dtype=np.float64)
    out = np.zeros(v.shape[:-1] + (3, 3))
    out[..., 0, 1], out[..., 0, 2] = -v[..., 2], v[..., 1]
    out[..., 1, 0], out[..., 1, 2] = v[..., 2], -v[..., 0]
    out[..., 2, 0], out[..., 2, 1] = -v[..., 1], v[..., 0]
    return out
