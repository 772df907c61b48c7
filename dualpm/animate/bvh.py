"""animation.bvh: skeleton-only motion of the rig's skin joints (numpy + scipy Rotation).

BVH describes a skeleton whose rest frames are all aligned with the world axes. The hierarchy is the
skin's joints (each joint's parent is its nearest ancestor joint); a joint's OFFSET is its rest position
minus its parent's, in the rig's own units; its rest frame is the world's. Every frame then gives
`W_j = R_posed_j @ R_rest_j^T`, the world rotation that takes joint j from rest to its pose (scale of the
glTF nodes removed by polar decomposition), and its BVH channels hold `W_parent^T @ W_j` as intrinsic Euler
angles in the order Z, X, Y (degrees: `Rotation.as_euler("ZXY")`, i.e. local = Rz @ Rx @ Ry), unwrapped
over time. The root joint (OFFSET 0) also has X/Y/Z position channels: its posed world position. A BVH
joint lands
exactly where skinning puts it whenever the pose keeps every non-root joint's rest translation (a rigid
skeleton); leaf joints end in an `End Site` one tenth of their bone beyond the joint.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from dualpm.errors import GltfError
from dualpm.skeleton.joints import joint_parents
from dualpm.fileio import atomic_write_text
from dualpm.gltf import SkinnedMesh
from dualpm.skinning import global_matrices, rest_pose

EULER_ORDER = "ZXY"  # BVH channel order of every joint (intrinsic: local = Rz @ Rx @ Ry)


def _rotations(world: np.ndarray) -> np.ndarray:
    """Nearest rotations (polar factors) of the upper 3x3 blocks of (..., 4, 4) matrices."""
    u, _, vt = np.linalg.svd(world[..., :3, :3])
    flip = np.linalg.det(u @ vt) < 0
    u[flip, :, 2] *= -1
    return u @ vt


def bvh_names(rig: SkinnedMesh) -> list[str]:
    """Joint names usable in BVH (no whitespace; unnamed or repeated names made unique), in joint order."""
    names: list[str] = []
    for j, node in enumerate(rig.joint_nodes):
        base = re.sub(r"\s+", "_", rig.node_names[node].strip()) or f"joint{j}"
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}_{k}"
        names.append(name)
    return names


def bvh_text(rig: SkinnedMesh, poses: np.ndarray, fps: float, scale: float = 1.0) -> str:
    """The BVH file of F poses of `rig`.

    Args:
        rig: the skinned mesh the poses belong to (its units: `scale` times the rig's own).
        poses: (F, N, 7) float node-local `[qw qx qy qz tx ty tz]`.
        fps: frames per second (> 0).
        scale: positions are divided by it (undo `synth --mesh-scale`).
    Returns:
        the text; raises `GltfError` if the skin's joints have more than one root.
    """
    poses = np.asarray(poses, dtype=np.float64)
    parents = joint_parents(rig)
    roots = np.flatnonzero(parents < 0)
    where = rig.source or rig.name
    if len(roots) != 1:
        raise GltfError(f"{where}: BVH needs one root joint, the skin has {len(roots)} "
                        f"({', '.join(rig.node_names[rig.joint_nodes[r]] or str(r) for r in roots[:5])})")
    nodes = np.array(rig.joint_nodes)  # writable: torch indexes with it
    rest_world = global_matrices(rig, torch.from_numpy(rest_pose(rig).astype(np.float64)))[0].numpy()[nodes]
    world = global_matrices(rig, torch.from_numpy(poses.copy()))[:, nodes].numpy()  # (F, J, 4, 4)
    rest_position = rest_world[:, :3, 3] / scale
    moved = _rotations(world) @ _rotations(rest_world).transpose(0, 2, 1)[None]  # W (F, J, 3, 3)
    parent_moved = np.where((parents >= 0)[None, :, None, None], moved[:, np.maximum(parents, 0)], np.eye(3))
    local = parent_moved.transpose(0, 1, 3, 2) @ moved
    euler = Rotation.from_matrix(local.reshape(-1, 3, 3)).as_euler(EULER_ORDER, degrees=True)
    euler = np.degrees(np.unwrap(np.radians(euler.reshape(len(poses), -1, 3)), axis=0))  # (F, J, 3)
    root = int(roots[0])
    names = bvh_names(rig)
    children = {j: np.flatnonzero(parents == j).tolist() for j in range(len(nodes))}
    order: list[int] = []
    lines = ["HIERARCHY"]

    def emit(j: int, indent: str) -> None:
        order.append(j)
        # The root's OFFSET is 0 and its position channels absolute (read the same by both conventions).
        offset = rest_position[j] - (rest_position[parents[j]] if parents[j] >= 0 else rest_position[j])
        lines.append(f"{indent}{'ROOT' if j == root else 'JOINT'} {names[j]}")
        lines.append(f"{indent}{{")
        lines.append(f"{indent}\tOFFSET {_numbers(offset)}")
        rotation = "Zrotation Xrotation Yrotation"
        channels = f"6 Xposition Yposition Zposition {rotation}" if j == root else f"3 {rotation}"
        lines.append(f"{indent}\tCHANNELS {channels}")
        for child in children[j]:
            emit(child, indent + "\t")
        if not children[j]:
            bone = offset if parents[j] >= 0 else np.zeros(3)
            end = _numbers(0.1 * bone)
            lines.extend([f"{indent}\tEnd Site", f"{indent}\t{{", f"{indent}\t\tOFFSET {end}",
                          f"{indent}\t}}"])
        lines.append(f"{indent}}}")

    emit(root, "")
    root_position = world[:, root, :3, 3] / scale  # (F, 3)
    motion = euler[:, order]  # (F, J, 3) in hierarchy order, columns Z X Y
    table = np.concatenate([root_position, motion.reshape(len(poses), -1)], axis=1)
    lines += ["MOTION", f"Frames: {len(poses)}", f"Frame Time: {1.0 / fps:.9g}"]
    lines += [_numbers(row) for row in table]
    return "\n".join(lines) + "\n"


def write_bvh(path: str | os.PathLike, rig: SkinnedMesh, poses: np.ndarray, fps: float,
              scale: float = 1.0) -> None:
    """Write `bvh_text(rig, poses, fps, scale)` to `path` atomically."""
    atomic_write_text(path, bvh_text(rig, poses, fps, scale))


def _numbers(values: np.ndarray) -> str:
    return " ".join(f"{float(v):.9g}" for v in np.asarray(values).ravel())
