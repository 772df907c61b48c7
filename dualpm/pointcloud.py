"""PLY point clouds and meshes: binary little-endian, written atomically, read back with trimesh.

Points are stored as float32 (`property float x/y/z`; float64 input is rounded to float32), colours as
uint8 RGBA with alpha 255 (`property uchar red/green/blue/alpha`), faces as `list uchar int`. Float
colours in [0, 1] are mapped to uint8 with `round(c * 255)`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import trimesh
from numpy.typing import ArrayLike
from trimesh.exchange.ply import load_ply

from dualpm.errors import DualPMError
from dualpm.fileio import atomic_write_bytes


class PlyError(DualPMError):
    """A PLY file, or data to be written as one, that cannot be used."""


def _points(path: Path, points: ArrayLike) -> np.ndarray:
    array = np.asarray(points)
    if array.ndim != 2 or array.shape[1] != 3 or not np.issubdtype(array.dtype, np.number):
        raise PlyError(f"{path}: points must be a numeric (N, 3) array, got {array.dtype} {array.shape}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise PlyError(f"{path}: points contain NaN or infinite values (or exceed the float32 range)")
    return array


def _colors(path: Path, colors: ArrayLike | None, count: int) -> np.ndarray | None:
    if colors is None:
        return None
    array = np.asarray(colors)
    if array.shape != (count, 3):
        raise PlyError(f"{path}: colours must be ({count}, 3) to match the points, got {array.shape}")
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating) or not ((array >= 0) & (array <= 1)).all():
        raise PlyError(f"{path}: colours must be uint8 or floats in [0, 1], got {array.dtype}")
    return np.round(array * 255.0).astype(np.uint8)


def _rgba(colors: np.ndarray) -> np.ndarray:
    return np.concatenate([colors, np.full((len(colors), 1), 255, dtype=np.uint8)], axis=1)


def _empty_cloud_ply(with_colors: bool) -> bytes:
    # trimesh cannot export a point cloud with no points; an inference can legitimately keep none, so
    # write the header of a valid empty cloud (same properties as a non-empty one).
    lines = ["ply", "format binary_little_endian 1.0", "element vertex 0"]
    lines += [f"property float {axis}" for axis in "xyz"]
    if with_colors:
        lines += [f"property uchar {channel}" for channel in ("red", "green", "blue", "alpha")]
    return ("\n".join(lines + ["end_header"]) + "\n").encode("ascii")


def write_ply(path: str | os.PathLike, points: ArrayLike, colors: ArrayLike | None = None) -> None:
    """Write a point cloud as binary little-endian PLY, atomically.

    Args:
        path: output file.
        points: (N, 3) float points (stored as float32), N may be 0.
        colors: (N, 3) uint8, or float in [0, 1], or None for no colour properties.
    """
    path = Path(path)
    xyz = _points(path, points)
    rgb = _colors(path, colors, len(xyz))
    if len(xyz) == 0:
        data = _empty_cloud_ply(rgb is not None)
    else:
        cloud = trimesh.PointCloud(xyz, colors=None if rgb is None else _rgba(rgb))
        data = cloud.export(file_type="ply", encoding="binary")
    atomic_write_bytes(path, data)


def write_mesh_ply(
    path: str | os.PathLike, vertices: ArrayLike, faces: ArrayLike, colors: ArrayLike | None = None
) -> None:
    """Write a triangle mesh (e.g. the reposed template) as binary little-endian PLY, atomically.

    Args:
        path: output file.
        vertices: (V, 3) float positions (stored as float32).
        faces: (F, 3) integer vertex indices in [0, V).
        colors: (V, 3) per-vertex uint8 or float in [0, 1] colours, or None.
    """
    path = Path(path)
    xyz = _points(path, vertices)
    tri = np.asarray(faces)
    if tri.ndim != 2 or tri.shape[1] != 3 or not np.issubdtype(tri.dtype, np.integer):
        raise PlyError(f"{path}: faces must be an integer (F, 3) array, got {tri.dtype} {tri.shape}")
    if tri.size and (tri.min() < 0 or tri.max() >= len(xyz)):
        raise PlyError(f"{path}: face indices must lie in [0, {len(xyz)}), got {tri.min()}..{tri.max()}")
    rgb = _colors(path, colors, len(xyz))
    # process=False: keep vertex order and duplicates exactly as given.
    mesh = trimesh.Trimesh(xyz, tri, vertex_colors=None if rgb is None else _rgba(rgb), process=False)
    atomic_write_bytes(path, mesh.export(file_type="ply", encoding="binary"))


def _header(data: bytes) -> list[str]:
    end = data.find(b"end_header")
    return data[:end].decode("ascii", errors="replace").splitlines() if end >= 0 else []


def read_ply(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the vertices of a PLY file (a point cloud, or a mesh's vertices) with trimesh.

    Returns:
        points (N, 3) in the stored float dtype (float32 for files from `write_ply`), and colours
        (N, 3) uint8, or None when the file has no vertex colours.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PlyError(f"{path}: cannot read PLY file ({error.strerror or error})") from error
    try:
        loaded = load_ply(io.BytesIO(data))
    except (ValueError, KeyError, IndexError) as error:
        raise PlyError(f"{path}: not a readable PLY file ({error})") from error
    if "vertices" not in loaded:
        header = _header(data)
        if "element vertex 0" not in header:
            raise PlyError(f"{path}: the PLY file has no vertex element")
        colored = any(line.startswith("property") and line.endswith(" red") for line in header)
        return np.zeros((0, 3), dtype=np.float32), (np.zeros((0, 3), dtype=np.uint8) if colored else None)
    points = np.asarray(loaded["vertices"])
    if not np.issubdtype(points.dtype, np.floating):
        points = points.astype(np.float64)
    colors = loaded.get("vertex_colors")
    if colors is not None:
        colors = trimesh.visual.color.to_rgba(np.asarray(colors))[:, :3]
    return points, colors
