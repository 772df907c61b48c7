"""Cameras and projection, in the conventions of the published DualPM dataset.

* Camera files (`cameras/<id>_camera.txt`) hold a 4x4 camera-to-world pose in Blender's Z-up world.
  The meshes (glTF) live in a Y-up world; the pose is brought there by left-multiplying
  `BLENDER_TO_Y_UP` and inverted to give the view (world-to-camera) matrix.
* Cameras are OpenGL-style: they look down -Z with +Y up (Blender cameras are the same).
* Perspective: `cot(fov_y / 2) = 2 * focal_mm / SENSOR_HEIGHT_MM`, near 0.1, far 30 (scene units),
  and the projection's y row is negated so image row 0 is the *top* of the image.
  Pixel (row i, column j) has its centre at NDC `x = 2 (j + 0.5) / W - 1`, `y = 2 (i + 0.5) / H - 1`
  (after the y negation), exactly where nvdiffrast samples.
* "Subtract depth": posed camera-space points have `view[2, 3]` (the camera's z translation)
  subtracted from z, so depth is centred on the object rather than the camera.

All tensor functions are batched over leading dimensions. Units: scene units (metres in the
published set) for positions, millimetres for focal lengths.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualpm.errors import DatasetError

SENSOR_HEIGHT_MM = 36.0
MAX_CAMERA_CONDITION = 1e6  # camera files whose 3x3 part is worse conditioned are refused (not invertible)
NEAR = 0.1
FAR = 30.0

# Blender (Z-up) world -> glTF (Y-up) world: (x, y, z) -> (x, z, -y).
BLENDER_TO_Y_UP = np.array(
    [[1, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)


def read_camera_txt(path: str | os.PathLike) -> np.ndarray:
    """Read a reference camera file: 4 lines of 4 floats, camera-to-world in a Z-up world.

    Returns:
        (4, 4) float64 array. Raises `DatasetError` naming the file if it is not 4x4, not finite,
        its last row is not `[0, 0, 0, 1]`, or it has no (numerically stable) inverse: the view
        matrix is its inverse.
    """
    path = Path(path)
    try:
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        matrix = np.array(rows, dtype=np.float64)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read camera matrix ({err})") from err
    if matrix.shape != (4, 4):
        raise DatasetError(f"{path}: camera file must hold 4 lines of 4 numbers, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise DatasetError(f"{path}: camera matrix has NaN or infinite entries")
    if not np.allclose(matrix[3], [0, 0, 0, 1], atol=1e-6):
        raise DatasetError(f"{path}: camera matrix last row must be [0 0 0 1], got {matrix[3].tolist()}")
    # With that last row the matrix is invertible exactly when its 3x3 part is; a rotation has condition
    # number 1, and a scaled one keeps it near 1, so anything far beyond is no camera pose.
    condition = np.linalg.cond(matrix[:3, :3])
    if not condition < MAX_CAMERA_CONDITION:  # also NaN / inf (singular)
        raise DatasetError(
            f"{path}: camera matrix is singular or nearly so (condition number {condition:.3g} of its 3x3 "
            "rotation part); expected a camera-to-world pose, a rotation and a translation"
        )
    return matrix


def format_camera_txt(camera_to_world_z_up: np.ndarray) -> str:
    """Text of a reference camera file for a (4, 4) camera-to-world pose in the Z-up world."""
    matrix = np.asarray(camera_to_world_z_up, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"camera pose must be (4, 4), got {matrix.shape}")
    # repr-precision floats so a file read back gives the identical matrix.
    return "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in matrix)


def view_from_camera_pose(camera_to_world_z_up: Tensor) -> Tensor:
    """View (world-to-camera, Y-up world) matrices from reference camera poses.

    Args:
        camera_to_world_z_up: (..., 4, 4) camera-to-world poses in the Blender Z-up world.
    Returns:
        (..., 4, 4) view matrices in the input dtype (computed in float64).
    """
    pose = camera_to_world_z_up.to(torch.float64)
    to_y_up = torch.as_tensor(BLENDER_TO_Y_UP, device=pose.device)
    return torch.linalg.inv(to_y_up @ pose).to(camera_to_world_z_up.dtype)


def camera_pose_from_view(view: Tensor) -> Tensor:
    """Inverse of `view_from_camera_pose`: (..., 4, 4) view -> camera-to-world in the Z-up world."""
    v = view.to(torch.float64)
    to_z_up = torch.as_tensor(np.linalg.inv(BLENDER_TO_Y_UP), device=v.device)
    return (to_z_up @ torch.linalg.inv(v)).to(view.dtype)


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """View matrices of OpenGL cameras at `eye` looking at `target` (Y-up world).

    Args:
        eye, target: (..., 3) positions in scene units.
        up: (..., 3) approximate up direction; default +Y.
    Returns:
        (..., 4, 4) world-to-camera matrices (camera looks down its -Z, +Y up).
    """
    if up is None:
        up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    back = eye - target  # camera +Z points away from what it looks at
    back = back / back.norm(dim=-1, keepdim=True)
    right = torch.linalg.cross(up, back, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    true_up = torch.linalg.cross(back, right, dim=-1)
    rotation = torch.stack([right, true_up, back], dim=-2)  # rows: camera axes in world coordinates
    view = torch.zeros(eye.shape[:-1] + (4, 4), dtype=eye.dtype, device=eye.device)
    view[..., :3, :3] = rotation
    view[..., :3, 3] = -(rotation @ eye[..., None])[..., 0]
    view[..., 3, 3] = 1
    return view


def projection_from_focal(
    focal_mm: Tensor | float,
    aspect: float = 1.0,
    near: float = NEAR,
    far: float = FAR,
) -> Tensor:
    """OpenGL perspective matrices with the y row negated (image row 0 at the top).

    Args:
        focal_mm: (...) focal lengths in millimetres for a 36 mm sensor height.
        aspect: image width / height.
        near, far: clip distances in scene units.
    Returns:
        (..., 4, 4) float32 (or the dtype of a tensor `focal_mm`) projection matrices.
    """
    focal = torch.as_tensor(focal_mm, dtype=torch.float32) if not torch.is_tensor(focal_mm) else focal_mm
    if not torch.is_floating_point(focal):
        focal = focal.float()
    cot = 2.0 * focal / SENSOR_HEIGHT_MM  # cot(fov_y / 2)
    proj = torch.zeros(focal.shape + (4, 4), dtype=focal.dtype, device=focal.device)
    proj[..., 0, 0] = cot / aspect
    proj[..., 1, 1] = -cot  # negated y row: NDC y = -1 is image row 0 (the top)
    proj[..., 2, 2] = -(far + near) / (far - near)
    proj[..., 2, 3] = -2.0 * far * near / (far - near)
    proj[..., 3, 2] = -1.0
    return proj


def focal_from_projection(projection: Tensor) -> Tensor:
    """Focal length in mm (36 mm sensor height) of (..., 4, 4) projections from `projection_from_focal`."""
    return projection[..., 1, 1].abs() * SENSOR_HEIGHT_MM / 2.0


def project_points(points_camera: Tensor, projection: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Project camera-space points to continuous pixel coordinates.

    Args:
        points_camera: (..., N, 3) points in camera space (before subtracting depth).
        projection: (..., 4, 4) projection matrices.
        height, width: image size in pixels.
    Returns:
        pixels: (..., N, 2) `(column, row)` in pixel units; pixel (i, j) spans [j, j+1) x [i, i+1)
            so its centre is (j + 0.5, i + 0.5).
        w: (..., N) clip-space w (positive in front of the camera).
    """
    homog = torch.cat([points_camera, torch.ones_like(points_camera[..., :1])], dim=-1)
    clip = homog @ projection.transpose(-1, -2)
    w = clip[..., 3]
    ndc = clip[..., :2] / w[..., None]
    size = torch.tensor([width, height], dtype=ndc.dtype, device=ndc.device)
    return (ndc + 1.0) * 0.5 * size, w


def pixel_rays(projection, height: int, width: int, pixels=None):
    """Camera-space rays through pixel centres, clipped to the near and far planes.

    Works for any invertible projection (perspective or orthographic): each ray runs from the
    pixel centre's point on the near plane to its point on the far plane. Takes and returns torch
    tensors, or numpy arrays (the CPU renderer's per-image call, where a dozen small torch operations
    cost more than the arithmetic); the arithmetic is the same code for both.

    Args:
        projection: (..., 4, 4) projection matrices (y row negated, as `projection_from_focal`).
        height, width: image size in pixels.
        pixels: optional (n,) int64 flat pixel indices `row * width + col`: rays of these pixels
            only (all pixels when None).
    Returns:
        origins: (..., H, W, 3) float64 ray starts on the near plane (camera space), or (..., n, 3).
        directions: (..., H, W, 3) float64 unit directions, or (..., n, 3).
        lengths: (..., H, W) float64 distances from the near to the far plane, or (..., n).
    """
    grid = pixels is None
    if isinstance(projection, np.ndarray):
        inv = np.linalg.inv(projection.astype(np.float64))
        pixels = np.arange(height * width) if grid else np.asarray(pixels)
        x, y = (pixels % width).astype(np.float64), (pixels // width).astype(np.float64)
    else:
        inv = torch.linalg.inv(projection.to(torch.float64))
        pixels = torch.arange(height * width, device=inv.device) if grid else pixels.to(inv.device)
        x = (pixels % width).to(torch.float64)
        y = torch.div(pixels, width, rounding_mode="floor").to(torch.float64)
    x = (x + 0.5) * (2.0 / width) - 1.0  # (n,) NDC of pixel centres
    y = (y + 0.5) * (2.0 / height) - 1.0

    # inv @ [x, y, z, 1] written as a sum of columns: a broadcast multiply-add is far cheaper than a
    # batched 4x4 matmul per pixel; the near (z = -1) and far (z = 1) points share all but the z column.
    # Component-major (4, n) rows: numpy's loops then run along n, not along 4 (3-4x faster).
    column = inv[..., :, :, None]  # (..., 4, 4, 1): column j of inv is column[..., j, :]
    xy = column[..., 0, :] * x + column[..., 1, :] * y + column[..., 3, :]  # (..., 4, n)
    near, far = xy - column[..., 2, :], xy + column[..., 2, :]
    start = near[..., :3, :] / near[..., 3:, :]  # (..., 3, n)
    delta = far[..., :3, :] / far[..., 3:, :] - start
    lengths = (delta * delta).sum(-2) ** 0.5  # (..., n)
    directions = delta / lengths[..., None, :]
    start, directions = start.mT, directions.mT  # (..., n, 3) views
    if grid:
        shape = tuple(inv.shape[:-2]) + (height, width)
        return start.reshape(shape + (3,)), directions.reshape(shape + (3,)), lengths.reshape(shape)
    return start, directions, lengths


def subtract_depth(points_camera: Tensor, view: Tensor) -> Tensor:
    """The reference's "subtract depth": z minus the camera's z translation `view[..., 2, 3]`.

    Args:
        points_camera: (..., N, 3) or (..., H, W, 3) camera-space points.
        view: (..., 4, 4) view matrices matching the leading batch dimensions.
    """
    offset = torch.zeros(view.shape[:-2] + (3,), dtype=points_camera.dtype, device=points_camera.device)
    offset[..., 2] = view[..., 2, 3].to(points_camera.dtype)
    extra = points_camera.dim() - offset.dim()
    return points_camera - offset.reshape(offset.shape[:-1] + (1,) * (extra) + (3,))
