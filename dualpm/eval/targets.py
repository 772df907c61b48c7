"""Inputs of the Animodel protocol: reconstruction and target files, target folders, and prediction frames.

Files: a reconstruction is a point cloud (PLY without faces) or a triangle mesh (OBJ, PLY with faces, GLB,
OFF, STL); a target is a triangle mesh. Meshes are loaded with trimesh as Animodel loads them (vertices
merged); OBJ materials and textures are not read, and glTF is taken only as self-contained GLB.

Target folders follow the Animodel benchmark (github.com/tomasjakab/animodel, README): per category,
`<category>/images/<id>.png` and `<category>/meshes/<id>.obj`, ids such as `000000`. `TargetMeshes` takes
the category folder or its `meshes/` folder and finds the mesh of a prediction by its sample id (the
image's stem, as `dualpm-infer --images` names samples).

Frames: Animodel scores a reconstruction in the target's world frame (+Y up), starting ICP from the
identity and trying one 180-degree turn about Y, so the reconstruction must already be roughly in that
frame. DualPM predicts posed points in camera space (the camera's depth subtracted); `to_frame` moves them:
- `world`: with the sample's camera known (a prepared dataset), back to the world frame exactly;
- `canonical`: the rigid transform (Kabsch, no scale) that best takes the predicted posed points onto their
  predicted canonical points: the posed animal seen in its rest-pose orientation, which is how a
  template-based method's posed mesh comes out. For targets without cameras (Animodel's own data); the
  rest pose of the training shapes must face the same way as the targets, up to the 180-degree turn
  (`--yaw` turns the cloud about +Y when the conventions differ);
- `camera`: as predicted (camera +Y is close to world up only for level cameras).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import trimesh

from dualpm.eval.align import kabsch_umeyama
from dualpm.eval.metrics import EvalError, as_points

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".off", ".stl")
FRAMES = ("world", "canonical", "camera")
_ID = re.compile(r"^[A-Za-z0-9._-]+$")


def load_geometry(path: str | Path) -> trimesh.Trimesh | np.ndarray:
    """A mesh (`trimesh.Trimesh`, vertices merged) or, for a file with points and no faces, (N, 3) float64
    points. Raises `EvalError` naming the file when it cannot be read or holds neither."""
    path = Path(path)
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise EvalError(f"{path}: unsupported file type {path.suffix!r} (use one of {', '.join(MESH_SUFFIXES)})")
    options = {"skip_materials": True} if path.suffix.lower() == ".obj" else {}
    if path.suffix.lower() == ".ply" and (problem := ply_problem(path)) is not None:
        raise EvalError(f"{path}: {problem}")
    try:
        # process=False: trimesh's processing drops non-finite vertices (and their faces) in silence;
        # they are counted first, then the mesh is processed (vertices merged) as Animodel loads it.
        loaded = trimesh.load(str(path), process=False, **options)
    except Exception as err:  # trimesh's loaders raise many types; the message names the file either way
        raise EvalError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if isinstance(loaded, trimesh.Scene):
        meshes = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh) and len(g.faces)]
        clouds = [g for g in loaded.dump() if isinstance(g, trimesh.PointCloud)]
        if meshes:
            loaded = trimesh.util.concatenate(meshes)
        elif clouds:
            loaded = trimesh.PointCloud(np.concatenate([c.vertices for c in clouds]))
        else:
            raise EvalError(f"{path}: the file holds no triangles and no points")
    if isinstance(loaded, trimesh.Trimesh | trimesh.PointCloud):
        vertices = np.asarray(loaded.vertices, dtype=np.float64)
        bad = int((~np.isfinite(vertices)).any(axis=1).sum()) if vertices.ndim == 2 else 0
        if bad:
            raise EvalError(f"{path}: {bad} of {len(vertices)} vertices are not finite (NaN or inf): the file is "
                            "damaged (dropping them would change the shape: fix or re-export it)")
    if isinstance(loaded, trimesh.Trimesh) and len(loaded.faces):
        loaded.process()
        return loaded
    if isinstance(loaded, trimesh.Trimesh | trimesh.PointCloud):
        return as_points(str(path), np.asarray(loaded.vertices, dtype=np.float64))
    raise EvalError(f"{path}: the file holds no triangles and no points")


def ply_problem(path: str | Path) -> str | None:
    """What is inconsistent in an ASCII PLY file (None: nothing found, or a binary file).

    The body must hold exactly the rows the header declares, element by element, one per line: a row of
    scalar properties has one value per property, a row of one list property its count and that many
    values. (trimesh reads the body as one stream of numbers: a header promising more vertices than the
    file holds turns face lines into vertices.)"""
    data = Path(path).read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0 or b"format ascii" not in data[:end]:
        return None
    elements: list[tuple[str, int, list[str]]] = []
    for line in data[:end].decode("ascii", errors="replace").splitlines():
        parts = line.split()
        if parts[:1] == ["element"] and len(parts) == 3 and parts[2].isdigit():
            elements.append((parts[1], int(parts[2]), []))
        elif parts[:1] == ["property"] and len(parts) >= 3 and elements:
            elements[-1][2].append("list" if parts[1] == "list" else "scalar")
    body = data[data.find(b"\n", end) + 1 :].decode("ascii", errors="replace").splitlines()
    rows = [line.split() for line in body if line.strip()]
    declared = ", ".join(f"{count} {name}" for name, count, _ in elements)
    if len(rows) != sum(count for _, count, _ in elements):
        return (f"the header declares {declared} rows ({sum(c for _, c, _ in elements)} lines), the body "
                f"holds {len(rows)} lines: the file is inconsistent (truncated or edited)")
    first = 0
    for name, count, props in elements:
        for k, row in enumerate(rows[first : first + count]):
            if props == ["list"]:
                wanted = 1 + int(row[0]) if row[0].isdigit() else -1
            elif "list" not in props:
                wanted = len(props)
            else:
                break  # rows mixing lists and scalars: trimesh checks them
            if len(row) != wanted:
                return (f"{name} row {k} holds {len(row)} values, the header's properties need "
                        f"{wanted if wanted >= 0 else 'a count first'}: the file is inconsistent")
        first += count
    return None


def load_target(path: str | Path) -> trimesh.Trimesh:
    """A target mesh (see `load_geometry`); a point cloud is refused: the target's volume is needed."""
    geometry = load_geometry(path)
    if not isinstance(geometry, trimesh.Trimesh):
        raise EvalError(f"{path}: a target must be a triangle mesh, not a point cloud")
    return geometry


class TargetMeshes:
    """Target meshes of an Animodel-layout folder, by sample id.

    Args:
        folder: a category folder holding `meshes/`, or the folder of meshes itself.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder / "meshes" if (folder / "meshes").is_dir() else folder
        if not self.folder.is_dir():
            raise EvalError(f"{folder}: no such folder of target meshes")
        self.paths: dict[str, Path] = {}
        duplicates = []
        for path in sorted(self.folder.iterdir()):
            if path.suffix.lower() in MESH_SUFFIXES and not path.name.startswith(".") and _ID.match(path.stem):
                if path.stem in self.paths:
                    duplicates.append(path.name)
                self.paths.setdefault(path.stem, path)
        if duplicates:
            raise EvalError(f"{self.folder}: several meshes for one id ({', '.join(duplicates[:5])})")
        if not self.paths:
            raise EvalError(f"{self.folder}: no target meshes ({', '.join(MESH_SUFFIXES)}) found")

    def match(self, ids: list[str]) -> tuple[list[str], list[str], list[str]]:
        """(ids with a target, prediction ids without one, target ids without a prediction), each sorted."""
        have = set(self.paths)
        return ([i for i in ids if i in have], sorted(set(ids) - have), sorted(have - set(ids)))


def camera_to_world(points: np.ndarray, view: np.ndarray) -> np.ndarray:
    """Posed points (N, 3) in camera space with the depth subtracted (z - view[2, 3]) -> the Y-up world.

    Args:
        points: (N, 3) float, scene units. view: (4, 4) float world -> camera matrix.
    """
    camera = np.asarray(points, dtype=np.float64).copy()
    camera[:, 2] += view[2, 3]
    inverse = np.linalg.inv(np.asarray(view, dtype=np.float64))
    return camera @ inverse[:3, :3].T + inverse[:3, 3]


def to_canonical_pose(posed: np.ndarray, canonical: np.ndarray) -> np.ndarray:
    """Posed points (N, 3) moved rigidly (Kabsch, no scale) to best match their canonical points (N, 3).
    An empty cloud stays empty (it scores inf)."""
    if len(posed) == 0:
        return np.zeros((0, 3))
    if len(posed) < 3:
        raise EvalError(f"{len(posed)} points: at least 3 are needed to find the rest-pose orientation")
    rotation, translation, _ = kabsch_umeyama(posed, canonical)
    return posed @ rotation.T + translation


def turn_about_y(points: np.ndarray, degrees: float) -> np.ndarray:
    """(N, 3) points turned by `degrees` about the +Y axis through the origin (right-handed)."""
    angle = np.radians(degrees)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return points @ rotation.T


def to_frame(frame: str, posed: np.ndarray, canonical: np.ndarray, view: np.ndarray | None, yaw: float
             ) -> np.ndarray:
    """Predicted posed points (N, 3), camera space with the depth subtracted, in the frame the protocol
    scores them in (module docstring); `canonical` (N, 3) are their canonical points, `view` the camera
    (needed for `world`). `yaw` degrees about +Y are applied last."""
    if frame == "world":
        if view is None:
            raise EvalError("frame 'world' needs the sample's camera (a prepared dataset with its source)")
        points = camera_to_world(posed, view)
    elif frame == "canonical":
        points = to_canonical_pose(np.asarray(posed, np.float64), np.asarray(canonical, np.float64))
    elif frame == "camera":
        points = np.asarray(posed, dtype=np.float64)
    else:
        raise EvalError(f"unknown frame {frame!r} (one of {', '.join(FRAMES)})")
    return turn_about_y(points, yaw) if yaw else points
