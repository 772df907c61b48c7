"""Motion transfer: the fitted motion of one rig replayed on another rig (its own bone lengths).

Joints are matched by node name; `joint_map` (source joint name -> target joint name) adds or overrides
pairs. Each matched joint's rotation relative to its rest is carried over in the rest pose's world frame:
with W the rest world rotation of a joint and R0 its rest local rotation,

    D = W_src (R0_src^-1 R_src) W_src^-1           the source joint's turn, in world axes
    R_tgt = R0_tgt W_tgt^-1 D W_tgt                 the same turn about the target joint's axes

so rigs whose joints have other local axes but a similar rest pose get the same motion, and a rig and a
re-proportioned copy of itself get exactly the source's local rotations. Unmatched target joints stay at
rest (and are returned). Bone offsets are the target's rest translations; the skeleton root's
translation moves by the source root's displacement from its rest (in the world axes of the rest pose),
scaled by the ratio of leg lengths (target / source), leg length being the rest height of the skeleton
root above the lowest rest vertex (the rigs' longest rest sides when a rig has none).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from dualpm.gltf import SkinnedMesh
from dualpm.skeleton.kinematics import RigTree, quat_wxyz_to_rotation, rotation_to_quat_wxyz
from dualpm.skeleton.rigid import SkeletonError
from dualpm.skinning import rest_pose, skin


def _rotation_part(matrices: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(matrices)
    sign = np.sign(np.linalg.det(u @ vt))
    u = u.copy()
    u[..., :, 2] *= sign[..., None]
    return u @ vt


def leg_length(rig: SkinnedMesh) -> float:
    """Rest height (+Y) of the first skeleton root above the lowest rest vertex (rig units); the longest
    side of the rest mesh when that height is not positive."""
    tree = RigTree.of(rig)
    world = tree.pose_world(tree.rest)
    vertices = skin(rig, rest_pose(rig), dtype=torch.float64)[0].numpy()
    height = float(world[tree.joint_nodes[tree.skeleton_roots[0]], 1, 3] - vertices[:, 1].min())
    return height if height > 0 else float(np.ptp(vertices, axis=0).max())


def match_joints(source: SkinnedMesh, target: SkinnedMesh, joint_map: Mapping[str, str] | None = None
                 ) -> dict[int, int]:
    """{target joint index: source joint index} by name, `joint_map` (source name -> target name) first.

    Raises SkeletonError when the map names a joint that either rig lacks, or maps two joints onto one.
    """
    source_names = [source.node_names[n] for n in source.joint_nodes]
    target_names = [target.node_names[n] for n in target.joint_nodes]
    source_index = {name: j for j, name in enumerate(source_names) if name}
    target_index = {name: j for j, name in enumerate(target_names) if name}
    pairs: dict[int, int] = {}
    for src, tgt in (joint_map or {}).items():
        if src not in source_index:
            raise SkeletonError(f"joint map: {src!r} is not a joint of the source rig {source.name!r}")
        if tgt not in target_index:
            raise SkeletonError(f"joint map: {tgt!r} is not a joint of the target rig {target.name!r}")
        if target_index[tgt] in pairs:
            raise SkeletonError(f"joint map: two source joints are mapped onto {tgt!r}")
        pairs[target_index[tgt]] = source_index[src]
    mapped_sources = set(pairs.values())
    for name, j in target_index.items():
        if j not in pairs and name in source_index and source_index[name] not in mapped_sources:
            pairs[j] = source_index[name]
    return pairs


def retarget_poses(
    source: SkinnedMesh, poses: np.ndarray, target: SkinnedMesh, joint_map: Mapping[str, str] | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Replay source poses on the target rig (see the module doc).

    Args:
        source: the rig `poses` belong to.
        poses: (F, source.num_nodes, 7) float node-local `[qw qx qy qz tx ty tz]`.
        target: the rig to animate.
        joint_map: source joint name -> target joint name, for joints whose names differ.
    Returns:
        (F, target.num_nodes, 7) float64 target poses, and the names of the target joints left at rest.
    """
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (source.num_nodes, 7) or not np.isfinite(poses).all():
        raise SkeletonError(f"{source.source or source.name}: poses must be finite (F, {source.num_nodes}, 7), "
                            f"got {poses.shape}")
    src, tgt = RigTree.of(source), RigTree.of(target)
    if tgt.num_joints == 0 or src.num_joints == 0:
        raise SkeletonError("retarget: both rigs need skin joints")
    pairs = match_joints(source, target, joint_map)
    src_world = _rotation_part(src.pose_world(src.rest)[:, :3, :3])  # (Ns, 3, 3) rest world rotations
    tgt_world = _rotation_part(tgt.pose_world(tgt.rest)[:, :3, :3])
    src_rest = quat_wxyz_to_rotation(src.rest[:, :4]).as_matrix()
    tgt_rest = quat_wxyz_to_rotation(tgt.rest[:, :4]).as_matrix()

    out = np.repeat(tgt.rest[None], len(poses), axis=0)
    for tj, sj in pairs.items():
        s_node, t_node = src.joint_nodes[sj], tgt.joint_nodes[tj]
        local = quat_wxyz_to_rotation(poses[:, s_node, :4]).as_matrix()  # (F, 3, 3)
        turn = src_world[s_node] @ src_rest[s_node].T @ local @ src_world[s_node].T  # world axes
        moved = tgt_rest[t_node] @ tgt_world[t_node].T @ turn @ tgt_world[t_node]
        out[:, t_node, :4] = rotation_to_quat_wxyz(Rotation.from_matrix(_rotation_part(moved)))

    ratio = leg_length(target) / leg_length(source)
    s_root = src.joint_nodes[src.skeleton_roots[0]]
    s_parent = src.parents[s_root]
    s_axes = src.pose_world(src.rest)[s_parent, :3, :3] if s_parent >= 0 else np.eye(3)
    displacement = (poses[:, s_root, 4:] - src.rest[s_root, 4:]) @ s_axes.T  # (F, 3) in world axes
    tgt_rest_world = tgt.pose_world(tgt.rest)
    for t_root in tgt.joint_nodes[tgt.skeleton_roots]:
        parent = tgt.parents[t_root]
        axes = tgt_rest_world[parent, :3, :3] if parent >= 0 else np.eye(3)
        out[:, t_root, 4:] = tgt.rest[t_root, 4:] + ratio * np.linalg.solve(axes, displacement.T).T
    target_names = [target.node_names[n] or f"joint{j}" for j, n in enumerate(target.joint_nodes)]
    unmatched = tuple(name for j, name in enumerate(target_names) if j not in pairs)
    return out, unmatched
