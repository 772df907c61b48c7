"""Rigid-body helpers shared by skinning, cameras, synthesis and evaluation.

Conventions: quaternions are real-first `[qw, qx, qy, qz]` (as in the reference pose files);
4x4 matrices act on column vectors (`p' = M @ [p, 1]`); node transforms compose as `T @ R @ S`
(glTF). All functions are batched over any leading dimensions and keep the input dtype/device.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from dualpm.errors import DualPMError


def quaternion_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrices from quaternions.

    Args:
        q: (..., 4) real-first quaternions `[w, x, y, z]`; need not be unit length (normalised here).
    Returns:
        (..., 3, 3) rotation matrices, same dtype/device as `q`.
    """
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
    w, x, y, z = q.unbind(-1)
    # Standard unit-quaternion expansion (Shoemake); rows of the matrix.
    m = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return m.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quaternion(m: Tensor) -> Tensor:
    """Quaternions `[w, x, y, z]` with w >= 0 from (..., 3, 3) rotation matrices.

    Uses the numerically stable branch per element (largest of w, x, y, z first).
    """
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    # 4 * squares of w, x, y, z (each >= 0 for a rotation); pick the largest as pivot.
    sq = torch.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1
    ).clamp_min(0)
    candidates = torch.stack(
        [
            torch.stack([sq[..., 0], m21 - m12, m02 - m20, m10 - m01], dim=-1),
            torch.stack([m21 - m12, sq[..., 1], m10 + m01, m02 + m20], dim=-1),
            torch.stack([m02 - m20, m10 + m01, sq[..., 2], m12 + m21], dim=-1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, sq[..., 3]], dim=-1),
        ],
        dim=-2,
    )  # (..., 4 pivots, 4 components)
    best = sq.argmax(dim=-1)
    q = torch.gather(candidates, -2, best[..., None, None].expand(best.shape + (1, 4))).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., :1] < 0, -q, q)


def axis_angle_to_quaternion(axis: Tensor, angle: Tensor) -> Tensor:
    """Quaternions `[w, x, y, z]` for rotations by `angle` (..., radians) about `axis` (..., 3)."""
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(axis.dtype).tiny)
    half = 0.5 * angle
    return torch.cat([torch.cos(half)[..., None], torch.sin(half)[..., None] * axis], dim=-1)


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product `a * b` of (..., 4) real-first quaternions (rotation b, then a)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        dim=-1,
    )


def trs_matrix(translation: Tensor, rotation: Tensor, scale: Tensor | None = None) -> Tensor:
    """4x4 matrices `T @ R @ S` (the glTF node transform).

    Args:
        translation: (..., 3).
        rotation: (..., 4) real-first quaternions.
        scale: (..., 3) or None for unit scale.
    Returns:
        (..., 4, 4) in the dtype/device of `translation`.
    """
    r = quaternion_to_matrix(rotation.to(translation.dtype))
    if scale is not None:
        r = r * scale[..., None, :]  # scales the columns: R @ diag(s)
    top = torch.cat([r, translation[..., :, None]], dim=-1)  # (..., 3, 4)
    bottom = torch.zeros(top.shape[:-2] + (1, 4), dtype=top.dtype, device=top.device)
    bottom[..., 0, 3] = 1
    return torch.cat([top, bottom], dim=-2)


def transform_points(matrix: Tensor, points: Tensor) -> Tensor:
    """Apply (..., 4, 4) affine matrices to (..., N, 3) points; returns (..., N, 3)."""
    return points @ matrix[..., :3, :3].transpose(-1, -2) + matrix[..., None, :3, 3]


def rigid_inverse(matrix: Tensor) -> Tensor:
    """Inverse of (..., 4, 4) rigid transforms `[R t; 0 1]` -> `[R^T -R^T t; 0 1]`."""
    rt = matrix[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(matrix)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -(rt @ matrix[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1
    return out


def checked_points(name: str, points: ArrayLike, error: type[DualPMError]) -> np.ndarray:
    """`points` as a (N, 3) float64 numpy array; raises `error` naming `name` if it is not finite (N, 3)."""
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise error(f"{name}: expected points of shape (N, 3), got {array.shape}")
    if not np.isfinite(array).all():
        raise error(f"{name}: {int((~np.isfinite(array)).any(axis=1).sum())} points are NaN or infinite")
    return array
