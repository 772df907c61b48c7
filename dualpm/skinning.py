"""Pose files, forward kinematics and batched linear-blend skinning (torch).

A pose is the LOCAL transform of every glTF node, `[qw, qx, qy, qz, tx, ty, tz]` (real-first
quaternion), as stored in the reference `poses/<id>_pose.npz` files under key "poses". A pose
replaces each node's rest rotation and translation; the node's own rest scale is kept:
`local = T(t) @ R(q) @ S(rest scale)`. Globals are parent-global @ local. A vertex is skinned by
the weighted sum of its joints' `global[joint_node] @ inverse_bind` matrices (glTF skinning; the
mesh node's own transform is ignored, as the glTF spec requires).

Everything is batched over B poses of one mesh; kinematics loop over tree depth, not over nodes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualpm.errors import DatasetError
from dualpm.fileio import atomic_output
from dualpm.geometry import trs_matrix
from dualpm.gltf import SkinnedMesh, node_depths

POSE_KEY = "poses"


def read_pose_file(path: str | os.PathLike, num_nodes: int | None = None) -> np.ndarray:
    """Read a pose file (.npz, key "poses").

    Returns:
        (N, 7) float32 node-local `[qw, qx, qy, qz, tx, ty, tz]` (files may hold any float or integer
        dtype; `write_pose_file` writes float64). Raises `DatasetError` naming the
        file if it is unreadable, lacks the key, has the wrong shape or node count (when
        `num_nodes` is given), non-finite values or a zero quaternion.
    """
    path = Path(path)
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DatasetError(f"{path}: pose file is not an .npz archive")
        with npz:
            if POSE_KEY not in npz.files:
                raise DatasetError(f"{path}: pose file has no key {POSE_KEY!r} (keys: {sorted(npz.files)})")
            poses = npz[POSE_KEY]
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: pose file not found") from err
    except (OSError, ValueError, EOFError) as err:  # not a zip, truncated, or pickled objects
        raise DatasetError(f"{path}: cannot read pose file ({err})") from err
    if poses.ndim != 2 or poses.shape[1] != 7 or poses.dtype.kind not in "fiu":
        raise DatasetError(
            f"{path}: poses must be numbers of shape (num_nodes, 7), got {poses.dtype} {poses.shape}"
        )
    if num_nodes is not None and len(poses) != num_nodes:
        raise DatasetError(f"{path}: poses has {len(poses)} nodes but the mesh has {num_nodes}")
    return _checked(poses.astype(np.float32), str(path))


def write_pose_file(path: str | os.PathLike, poses: np.ndarray) -> None:
    """Atomically write (N, 7) node-local poses `[qw, qx, qy, qz, tx, ty, tz]` to an .npz, as float64.

    float64 because the reference reader keeps the file's dtype and multiplies the poses with its
    float64 mesh matrices (a float32 file fails there); see docs/dataset.md.
    """
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 2 or poses.shape[1] != 7:
        raise DatasetError(f"{path}: poses must have shape (num_nodes, 7), got {poses.shape}")
    poses = _checked(poses, str(path))
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        # A file handle, not a name: np.savez would append ".npz" to the temporary name.
        np.savez(fh, **{POSE_KEY: poses})


def _checked(poses: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(poses).all():
        raise DatasetError(f"{where}: poses contain NaN or infinite values")
    bad = np.linalg.norm(poses[:, :4], axis=1) < 1e-8
    if bad.any():
        raise DatasetError(f"{where}: node {int(np.argmax(bad))} has a zero quaternion")
    return poses


def rest_pose(mesh: SkinnedMesh) -> np.ndarray:
    """(N, 7) float32 pose of the mesh's rest TRS: `[rest_rotation (wxyz), rest_translation]`."""
    return np.concatenate([mesh.rest_rotation, mesh.rest_translation], axis=1)


def _as_poses(mesh: SkinnedMesh, poses: Tensor | np.ndarray, device=None, dtype=None) -> Tensor:
    poses = torch.as_tensor(poses, device=device, dtype=dtype)
    if poses.ndim == 2:
        poses = poses[None]
    if poses.ndim != 3 or poses.shape[1:] != (mesh.num_nodes, 7):
        raise DatasetError(
            f"{mesh.source or mesh.name}: poses of shape {tuple(poses.shape)} do not match its "
            f"{mesh.num_nodes} nodes; expected (B, {mesh.num_nodes}, 7)"
        )
    return poses


def local_matrices(mesh: SkinnedMesh, poses: Tensor) -> Tensor:
    """Node-local transforms `T(t) @ R(q) @ S(rest scale)`.

    Args:
        poses: (B, N, 7) or (N, 7) float tensor, `[qw, qx, qy, qz, tx, ty, tz]` per node (scene units).
    Returns:
        (B, N, 4, 4) on the device/dtype of `poses`.
    """
    poses = _as_poses(mesh, poses)
    scale = torch.tensor(mesh.rest_scale, device=poses.device, dtype=poses.dtype)
    return trs_matrix(poses[..., 4:], poses[..., :4], scale.expand(poses.shape[:-1] + (3,)))


def global_matrices(mesh: SkinnedMesh, poses: Tensor) -> Tensor:
    """Node-to-world transforms by forward kinematics, parents first, one step per tree level.

    Args:
        poses: (B, N, 7) or (N, 7) float tensor of node-local poses (see `local_matrices`).
    Returns:
        (B, N, 4, 4) on the device/dtype of `poses`.
    """
    local = local_matrices(mesh, poses)
    depth = node_depths(mesh.parents)
    world = local
    for level in range(1, int(depth.max()) + 1):
        nodes = np.flatnonzero(depth == level)
        idx = torch.as_tensor(nodes, device=local.device)
        par = torch.tensor(mesh.parents[nodes], device=local.device)
        # Out-of-place so autograd sees a plain function of the inputs.
        world = world.index_copy(1, idx, world[:, par] @ local[:, idx])
    return world


def joint_matrices(mesh: SkinnedMesh, poses: Tensor) -> Tensor:
    """Skinning matrices `global[joint_nodes] @ inverse_bind`.

    Args:
        poses: (B, N, 7) or (N, 7) float tensor of node-local poses.
    Returns:
        (B, J, 4, 4) on the device/dtype of `poses`; maps bind-pose positions to posed world space.
    """
    world = global_matrices(mesh, poses)
    idx = torch.tensor(mesh.joint_nodes, device=world.device)
    inverse_bind = torch.tensor(mesh.inverse_bind, device=world.device, dtype=world.dtype)
    return world[:, idx] @ inverse_bind


def skin(
    mesh: SkinnedMesh,
    poses: Tensor | np.ndarray,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Linear-blend skinning of the bind-pose vertices for a batch of poses.

    Args:
        poses: (B, N, 7) or (N, 7) node-local `[qw, qx, qy, qz, tx, ty, tz]`, NumPy array or
            tensor (scene units). A single (N, 7) pose is treated as a batch of one.
        device: where to compute; default the device of `poses` (CPU for NumPy input).
        dtype: floating dtype of the computation and result.
    Returns:
        (B, V, 3) posed vertex positions in world space (scene units), `dtype` on `device`.
    """
    if device is None:
        device = poses.device if isinstance(poses, Tensor) else "cpu"
    poses = _as_poses(mesh, poses, device=device, dtype=dtype)
    mats = joint_matrices(mesh, poses)[:, :, :3, :]  # (B, J, 3, 4): the last row is [0 0 0 1]
    batch, num_joints = mats.shape[:2]
    # Dense (V, J) weights (duplicate joints in a row add up): blending is then one matmul, several
    # times faster on CPU than gathering K matrices per vertex, and never builds (B, V, K, 4, 4).
    # Memory V * J, fine for animal rigs (tens to hundreds of joints).
    joints = torch.tensor(mesh.joints, device=poses.device)
    weights = torch.tensor(mesh.weights, device=poses.device, dtype=dtype)
    dense = torch.zeros(len(joints), num_joints, device=poses.device, dtype=dtype)
    dense = dense.scatter_add(1, joints, weights)  # (V, J)
    blended = (dense @ mats.reshape(batch, num_joints, 12)).reshape(batch, -1, 3, 4)  # (B, V, 3, 4)
    vertices = torch.tensor(mesh.vertices, device=poses.device, dtype=dtype)
    homogeneous = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=1)  # (V, 4)
    # One contraction over the 4 columns (the translation times 1 added last, as `rotation @ v + t`
    # would): the same float32 sums, 2x faster than the 3x3 product and a separate add.
    return torch.einsum("bvij,vj->bvi", blended, homogeneous)
