"""The Animodel benchmark's per-sample protocol (Farm3D, MagicPony, 3D-Fauna and DualPM report it).

Animodel (github.com/tomasjakab/animodel, `src/animodel/eval.py` and `src/animodel/utils/mesh.py`) scores
one reconstructed mesh R against one target mesh T. Both are in T's world frame with +Y up. In our words:

1. Volume. A mesh is voxelised at a pitch of (shortest side of its own axis-aligned box) / 100: every
   voxel, on a grid whose centres are integer multiples of the pitch, that holds a vertex of the mesh
   subdivided until no edge is longer than half the pitch (trimesh's `voxelized`); the inside is then
   filled (scipy's binary hole filling). Volume = filled voxels x pitch^3.
2. Rescale. R is scaled about the world origin by cbrt(volume(T) / volume(R)).
3. Remesh. The scaled R is voxelised again (its own pitch, filled) and replaced by the marching-cubes
   surface of that grid, scaled about the origin by the mean over the three axes of (box side of R /
   box side of the new surface) and moved so that its area-weighted centroid is R's.
4. ICP. 8,000 "even" points of each surface (below); point-to-point ICP from the identity, rotation and
   translation only (no scale, no reflection), at most 200 iterations, stopping early only when the
   mean squared residual rises (trimesh's `registration.icp` with threshold 0). R is moved by the result.
5. Chamfer. 60,000 even points of each surface; each direction is the mean Euclidean (not squared)
   distance to the nearest point of the other set; "bidirectional" is the mean of the two directions.
   Unit-cube numbers multiply all three by 1 / (longest side of T's axis-aligned box in its world frame).
6. Flip. R as aligned in 4 is turned 180 degrees about the world Y axis (through the world origin),
   steps 4-5 are repeated, and the alignment with the lower bidirectional distance is kept.

Even points: trimesh's `sample_surface_even` (3n area-weighted random points, then points closer than
sqrt(area / 3n) to another are dropped), repeated and concatenated until there are n, the first n kept.

Where this implementation differs, and why it does not change the numbers:
- Voxelisation (step 1, 3) samples every triangle on a barycentric lattice fine enough that no lattice
  step exceeds half the pitch, instead of trimesh's edge-by-edge subdivision (seconds per mesh for an
  animal at Animodel's pitch). Both mark the voxels around points at most half a pitch apart on the
  surface; the filled volumes agree to about 0.1% (tests/test_eval_animodel.py checks the two
  against each other), a 0.03% change of the rescale factor.
- Each surface is sampled once per protocol step (8,000 and 60,000 points) and the samples are moved
  with the mesh, rather than sampling the moved mesh again (Animodel re-draws them for the flipped
  branch). A rigid motion maps even samples of a surface to even samples of the moved surface, so the
  distribution of every number is the same; the flipped and unflipped branches are compared on the
  same target points, which only removes sampling noise from the choice.
- ICP stops when an iteration leaves every correspondence unchanged: from then on trimesh's loop
  repeats the same step until its 200 iterations are spent, so the result is the same.
- Samples come from a seeded generator: the same inputs and seed give the same numbers.

Speed (issue 26), none of which changes a number beyond the rounding of sums (and of a lattice point at
an exact half-voxel tie, below): `score_all` makes a target's volume, samples, KD-trees and Delaunay graph
once for every cloud scored against it (a model's and the baseline's; the target's samples are drawn
first, so each cloud's samples continue the same random stream as when scored alone). The remesh (step 3)
reuses the grid of the volume (step 1): scaling about the origin scales the pitch alike, so the scaled
mesh's grid is the same one (only a lattice point rounding at an exact half-voxel tie could differ; tested
equal). Even samples are trimesh's, bit for bit, drawn with fewer temporaries (`sampling`), and kept in
Morton order (cache-friendly KD-trees). ICP's nearest neighbours are exact: `DelaunayTracker` walks the
Delaunay graph of the target's ICP points (made once per target) from each point's previous nearest one,
in compiled code (numba), and queries the KD-tree only for points that jumped. Of the two alignments
(step 6), the Chamfer distance of the one with the lower ICP residual is measured first and the other's
stops as soon as its partial sums show it cannot win (`_chamfer`); both are exact, so the choice is the
same. The Chamfer KD-trees are built for far queries (`chamfer_tree`).

Point clouds have no volume and no surface to sample. `mesh_from_points` turns one into a closed surface
first (see its docstring: voxel occupancy at a pitch set by the cloud's own point spacing, morphological
closing, hole filling, marching cubes, the cloud's box restored), and that surface then goes through
steps 1-6 unchanged, exactly as a reconstructed mesh would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numba
import numpy as np
import trimesh
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure

from dualpm.eval.align import apply_transform, similarity_matrix, umeyama_from_moments
from dualpm.eval.metrics import ChamferResult, EvalError, as_points
from dualpm.eval.nearest import DelaunayGraph, DelaunayTracker, NearestTracker
from dualpm.eval.sampling import morton_order, sample_surface_even

PROTOCOL = "animodel"
MAX_VOXELS = 400_000_000  # a dense grid beyond this (400 MB of bools) means a degenerate box: refuse it
_LATTICE_BUDGET = 4_000_000  # lattice points generated per chunk while voxelising (memory bound)


@dataclass(frozen=True)
class PointMeshing:
    """How a point cloud becomes a closed surface (`mesh_from_points`).

    max_closing: largest closing radius tried, in voxels. enclosing_jump: the least growth of the solid's
    volume from one radius to the next that counts as the shell closing. max_cells: the grid has at
    most this many voxels along the cloud's longest side (bounds the cost of very dense clouds).
    """

    max_closing: int = 12
    enclosing_jump: float = 1.5
    max_cells: int = 256


@dataclass(frozen=True)
class AnimodelOptions:
    """Settings of the protocol; the defaults are Animodel's (`eval.py::run`)."""

    align_points: int = 8000  # even points per surface for ICP
    icp_iterations: int = 200
    chamfer_points: int = 60000  # even points per surface for the Chamfer distance
    min_cubes: int = 100  # voxel pitch = shortest box side / min_cubes
    rescale: bool = True  # volume rescale + remesh (steps 2-3)
    flip: bool = True  # also try the 180-degree turn about world Y (step 6)
    seed: int = 0
    meshing: PointMeshing = field(default_factory=PointMeshing)


@dataclass(frozen=True, eq=False)
class AnimodelScore:
    """One sample's result. Distances are in the target's units; `unit` = those x `unit_scale`."""

    chamfer: ChamferResult  # pred_to_target = reconstruction -> target, target_to_pred, symmetric = bidir
    unit_scale: float  # 1 / longest side of the target's axis-aligned box
    volume_scale: float  # factor of the volume rescale (1.0 without it)
    flipped: bool  # the 180-degree turn gave the lower bidirectional distance
    transform: np.ndarray  # (4, 4) kept ICP transform (applied after rescale and remesh; flip included)
    icp_iterations: int  # ICP iterations run for the kept alignment
    points_meshed: bool  # the reconstruction was a point cloud meshed by `mesh_from_points`
    enclosed: bool  # a mesh, or a point cloud whose meshing closed the shell (`PointSurface.enclosed`)

    @property
    def unit(self) -> ChamferResult:
        return self.chamfer.scaled(self.unit_scale)

    def metrics(self) -> dict[str, float]:
        """Flat metrics: chamfer_{pred_to_gt,gt_to_pred,sym}, unit_chamfer_..., volume_scale, flipped."""
        out = {}
        for prefix, result in (("", self.chamfer), ("unit_", self.unit)):
            out[f"{prefix}chamfer_pred_to_gt"] = result.pred_to_target
            out[f"{prefix}chamfer_gt_to_pred"] = result.target_to_pred
            out[f"{prefix}chamfer_sym"] = result.symmetric
        out["volume_scale"] = self.volume_scale
        out["flipped"] = float(self.flipped)
        out["enclosed"] = float(self.enclosed)
        return out


def _check_mesh(name: str, mesh: trimesh.Trimesh) -> None:
    if len(mesh.faces) == 0 or not np.isfinite(mesh.vertices).all():
        raise EvalError(f"{name}: the mesh has no triangles or has non-finite vertices")
    if not mesh.area > 0 or not mesh.extents.min() > 0:
        raise EvalError(f"{name}: the mesh is flat or has no area (box sides {np.round(mesh.extents, 6).tolist()}); "
                        "it has no volume to voxelise")


def _grid_size_check(shape: np.ndarray, name: str) -> None:
    if int(np.prod(shape)) > MAX_VOXELS:
        raise EvalError(f"{name}: a voxel grid of {shape.tolist()} voxels is too large; the box is too flat "
                        "for a pitch set by its shortest side")


def _surface_grid(vertices: np.ndarray, faces: np.ndarray, pitch: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (centres at integer multiples of `pitch`) holding a point of a barycentric lattice over every
    triangle, n = 2^k steps per edge with the least k that makes every step at most pitch / 2 (step 1).

    Returns:
        grid (X, Y, Z) bool over the box of the marked voxels; low (3,) int64, the index of grid[0, 0, 0].
    """
    tri = vertices[faces]  # (F, 3 corners, 3)
    # Rounding is monotone and the corners are lattice points: the marked box is that of the vertices.
    low = np.round(vertices.min(axis=0) / pitch).astype(np.int64)
    shape = np.round(vertices.max(axis=0) / pitch).astype(np.int64) - low + 1
    _grid_size_check(shape, name)
    grid = np.zeros(shape, dtype=bool)
    longest = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2).max(axis=1)  # (F,)
    halvings = np.ceil(np.log2(np.maximum(longest / (0.5 * pitch), 1.0)) - 1e-12).astype(np.int64)
    for k in np.unique(halvings):
        n = 2 ** int(k)
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        weights = np.stack([n - i[keep] - j[keep], i[keep], j[keep]], axis=1) / n  # (P, 3) barycentric
        group = tri[halvings == k]
        for w in np.array_split(weights, len(weights) // _LATTICE_BUDGET + 1):
            per_chunk = max(1, _LATTICE_BUDGET // len(w))
            for start in range(0, len(group), per_chunk):
                points = (w @ group[start:start + per_chunk]).reshape(-1, 3)  # (P, 3) @ (f, 3, 3) -> (f * P, 3)
                points /= pitch  # in place: the values of np.round(points / pitch), fewer temporaries
                np.rint(points, out=points)
                index = points.astype(np.int64)
                index -= low  # (f * P, 3)
                grid[index[:, 0], index[:, 1], index[:, 2]] = True
    return grid, low


def fill_inside(grid: np.ndarray) -> np.ndarray:
    """`grid` (X, Y, Z) bool with every empty voxel that no 6-connected empty path links to the grid's border
    set: the result of `scipy.ndimage.binary_fill_holes(grid)` (what trimesh's `fill` runs), computed from
    one labelling of the empty voxels instead of an iterated dilation (several times faster)."""
    labels, count = ndimage.label(~grid)  # default structure: 6-connectivity, as binary_fill_holes
    outside = np.zeros(count + 1, dtype=bool)  # label -> touches the border (label 0: the surface itself)
    outside[labels[[0, -1]]] = outside[labels[:, [0, -1]]] = outside[labels[:, :, [0, -1]]] = True
    outside[0] = False
    return grid | ~outside[labels]


def voxelise(mesh: trimesh.Trimesh, min_cubes: int, name: str = "mesh") -> tuple[np.ndarray, float, np.ndarray]:
    """Filled voxel grid of a mesh at Animodel's pitch (step 1).

    Returns:
        grid (X, Y, Z) bool, filled; pitch (scene units); low (3,) int64: grid[i, j, k] is the voxel centred
        at (low + (i, j, k)) * pitch.
    """
    _check_mesh(name, mesh)
    pitch = float(mesh.extents.min()) / min_cubes
    grid, low = _surface_grid(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), pitch, name)
    return fill_inside(grid), pitch, low


def voxel_volume(mesh: trimesh.Trimesh, min_cubes: int, name: str = "mesh", enclosing: bool = False) -> float:
    """Animodel's volume of a mesh: filled voxels x pitch^3 (scene units cubed).

    enclosing: raise `EvalError` when the surface encloses no voxel at this pitch (holes wider than a
    voxel let the fill leak out: the "volume" would be that of the surface's shell, meaningless)."""
    _check_mesh(name, mesh)
    pitch = float(mesh.extents.min()) / min_cubes
    surface, _ = _surface_grid(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), pitch, name)
    filled = int(np.count_nonzero(fill_inside(surface)))
    if enclosing and filled == int(np.count_nonzero(surface)):
        edges = trimesh.grouping.group_rows(mesh.edges_sorted, require_count=1)
        raise EvalError(
            f"{name}: the mesh encloses no volume at the protocol's voxel pitch {pitch:.4g} (it is not watertight: "
            f"{len(edges)} edges bound a hole), and the Animodel protocol rescales the reconstruction by the "
            "target's volume; close its holes, or score with --no-rescale (no volume rescale, marked in the output)"
        )
    return float(filled) * pitch**3


def _marching_cubes(grid: np.ndarray) -> trimesh.Trimesh:
    """trimesh's `voxel.ops.matrix_to_marching_cubes(grid)` (skimage's marching cubes at the 0/1 boundary,
    padded so the surface closes), without its vertex merge: marching cubes puts one vertex on each crossed
    grid edge, at its midpoint here, so there is nothing to merge (tested equal; a third of the time)."""
    padded = np.pad(~grid, 1, mode="constant", constant_values=True)
    vertices, faces, _, _ = measure.marching_cubes(padded, level=0.5, spacing=(1.0, 1.0, 1.0))
    return trimesh.Trimesh(np.subtract(vertices, (1.0, 1.0, 1.0)), faces, process=False)


def _match_box(mesh: trimesh.Trimesh, extents: np.ndarray, centre: np.ndarray) -> trimesh.Trimesh:
    """`mesh` scaled about the origin by mean(extents / its extents), then moved so its centroid is `centre`."""
    scale = float(np.mean(extents / mesh.extents))
    vertices = mesh.vertices * scale
    moved = trimesh.Trimesh(vertices, mesh.faces, process=False)
    moved.apply_translation(centre - moved.centroid)
    return moved


def remesh(mesh: trimesh.Trimesh, min_cubes: int, name: str = "reconstruction") -> trimesh.Trimesh:
    """Step 3: marching cubes of the filled voxel grid, restored to the mesh's box size and centroid."""
    grid, _, _ = voxelise(mesh, min_cubes, name)
    return _match_box(_marching_cubes(grid), mesh.extents, mesh.centroid)


@dataclass(frozen=True, eq=False)
class PointSurface:
    """`mesh_from_points`' result: the surface and how it was made."""

    mesh: trimesh.Trimesh  # closed surface, scene units
    pitch: float  # voxel pitch (scene units)
    closing: int  # closing radius chosen, in voxels
    enclosed: bool  # some closing radius made the volume jump by `enclosing_jump`: the shell closed


def mesh_from_points(points: ArrayLike, meshing: PointMeshing = PointMeshing(), name: str = "prediction"
                     ) -> PointSurface:
    """A closed surface around a point cloud, so that it can be scored like a mesh.

    The points mark voxels of a grid whose pitch is their median nearest-neighbour spacing (at least the
    longest box side / `max_cells`), so the result does not depend on the cloud's scale. A surface sampled
    by points leaves gaps between them, and a layered (depth-peeled) cloud leaves slits wherever the surface
    turns away from the camera; a closing makes the shell watertight: the marked voxels are grown by a ball
    of radius r voxels, the inside of the grown shell is filled, and the filled solid is shrunk by the same
    ball (dilate, fill, erode: the order matters, a closing of a thin sheet alone would erode the sheet
    away). While the shell has holes, the solid is little more than the sheet; at the radius that closes
    it, the filled volume jumps by a large factor (3-20x on our animals), and beyond it grows by a few per
    cent per voxel as concavities fill. r is the radius after the largest jump (the search stops one radius
    after a jump of at least `enclosing_jump`). The marching-cubes surface of that solid is then restored
    to the points' own box (scaled about the origin by the mean ratio of box sides, moved so the box
    centres agree), as Animodel restores its remeshed surfaces.

    Args:
        points: (N, 3) float points, scene units, N >= 4, not all in one plane.
    Returns:
        `PointSurface`; `enclosed` is False when no radius up to `max_closing` closed the shell (a single
        visible side of a surface, say): its volume is then that of a thin solid around the points.
    """
    points = as_points(name, points)
    if len(points) < 4:
        raise EvalError(f"{name}: {len(points)} points cannot be meshed (at least 4 are needed)")
    extents = points.max(axis=0) - points.min(axis=0)
    spacing = cKDTree(points).query(points, k=2)[0][:, 1]  # distance to the nearest other point
    spacing = spacing[spacing > 0]
    if len(spacing) == 0 or not extents.min() > 0:
        raise EvalError(f"{name}: the points are all equal or lie in a plane (box sides "
                        f"{np.round(extents, 6).tolist()}); they enclose no volume")
    pitch = max(float(np.median(spacing)), float(extents.max()) / meshing.max_cells)
    indices = np.round(points / pitch).astype(np.int64)
    pad = meshing.max_closing + 2  # room for the largest ball, and an empty border for the hole filling
    low = indices.min(axis=0) - pad
    shape = indices.max(axis=0) - low + 1 + pad
    _grid_size_check(shape, name)
    marked = np.zeros(shape, dtype=bool)
    marked[tuple((indices - low).T)] = True
    # Dilation by a ball of radius r = voxels within r of a marked one; erosion = voxels farther than r
    # from any empty one: one Euclidean distance transform per step instead of ball convolutions.
    near = ndimage.distance_transform_edt(~marked)
    best_jump, best_solid, closing = 0.0, marked, 0
    volume = int(np.count_nonzero(marked))
    for radius in range(1, meshing.max_closing + 1):
        filled = fill_inside(near <= radius)
        solid = (ndimage.distance_transform_edt(filled) > radius) | marked
        grown = int(np.count_nonzero(solid))
        jump, volume = grown / volume, grown
        if jump > best_jump:
            best_jump, best_solid, closing = jump, solid, radius
        elif best_jump >= meshing.enclosing_jump:
            break  # past the closing step: the volume now only creeps up
    surface = _marching_cubes(best_solid)
    scaled = surface.vertices * float(np.mean(extents / surface.extents))
    shift = 0.5 * (points.min(axis=0) + points.max(axis=0)) - 0.5 * (scaled.min(axis=0) + scaled.max(axis=0))
    mesh = trimesh.Trimesh(scaled + shift, surface.faces, process=False)
    return PointSurface(mesh, pitch, closing, best_jump >= meshing.enclosing_jump)


def sample_even(mesh: trimesh.Trimesh, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, 3) float64 "even" surface points (module docstring), drawn from `rng`."""
    batches, total = [], 0
    while total < count:
        points = sample_surface_even(mesh, count, rng)  # trimesh's, the same points
        if len(points) == 0:
            raise EvalError("sample_even: no point could be drawn on the surface")
        batches.append(points)
        total += len(points)
    return np.concatenate(batches)[:count].astype(np.float64)


def chamfer_tree(points: np.ndarray) -> cKDTree:
    """KD-tree of a Chamfer point set. The Chamfer distance of a poor alignment is made of far queries (many
    point spacings away), and those ran fastest with leaves of 64 points (2-3x faster than scipy's 16; 64 was
    the best of 16-128 on the demo's model and baseline clouds), sliding-midpoint splits and node boxes not
    shrunk to their points (`balanced_tree=False, compact_nodes=False`: 30-35% faster queries than the
    defaults, and faster to build). The tree's shape changes no distance."""
    return cKDTree(points, leafsize=64, balanced_tree=False, compact_nodes=False)


def spatial_order(points: np.ndarray, bits: int = 10) -> np.ndarray:
    """`points` (N, 3) reordered along a Morton (Z-order) curve over their box (`sampling.morton_order`):
    neighbours in space become neighbours in memory, which makes KD-tree builds and batches of queries about
    2x faster (cache). Even samples are a set, so their order changes no number beyond the rounding of sums."""
    return points[morton_order(points, bits)]


@numba.njit(cache=True, nogil=True)
def column_mean(points: np.ndarray) -> np.ndarray:
    """(3,) float64 mean of (N >= 1, 3) float64 points over N: `points.mean(axis=0)` bit for bit (numpy adds
    the rows one after the other into the first; tested), 15x faster than numpy's strided reduction (ICP
    takes one every iteration)."""
    x, y, z = points[0, 0], points[0, 1], points[0, 2]
    for i in range(1, points.shape[0]):
        x, y, z = x + points[i, 0], y + points[i, 1], z + points[i, 2]
    n = points.shape[0]
    return np.array([x / n, y / n, z / n])


def icp_until_settled(source: np.ndarray, target: np.ndarray, iterations: int, tree: cKDTree | None = None,
                      graph: DelaunayGraph | None = None) -> tuple[np.ndarray, int]:
    """(4, 4) rigid transform and iterations of `icp_residual` (which see)."""
    matrix, done, _ = icp_residual(source, target, iterations, tree, graph)
    return matrix, done


def icp_residual(source: np.ndarray, target: np.ndarray, iterations: int, tree: cKDTree | None = None,
                 graph: DelaunayGraph | None = None) -> tuple[np.ndarray, int, float]:
    """Point-to-point rigid ICP from the identity with trimesh's `registration.icp(threshold=0)` rule.

    Each iteration matches every moved source point to its nearest target point and refits the rigid
    transform (source -> matches, reflection-safe Kabsch); it stops after `iterations`, when the mean squared
    residual of the fit rises (that step is kept, as trimesh keeps it), or when no correspondence changed
    (every later iteration would repeat the same step). The matches come from a `DelaunayTracker` walking
    `graph` when one is given (any ICP: a walk step costs less than re-checking 16 KD-tree candidates), else
    from a `NearestTracker`; both give the KD-tree's matches, so the choice changes the speed only.

    Args:
        source: (N, 3) float64 points to move; target: (M, 3) float64 points, same units.
        tree: a `cKDTree` of `target` to reuse (several sources aligned to one target), or None.
        graph: the `DelaunayGraph` of `target` (`DelaunayGraph.of`), or None.
    Returns:
        (4, 4) float64 rigid transform, iterations run, mean squared residual of its fit (scene units^2).
    """
    tree = cKDTree(target) if tree is None else tree
    nearest = NearestTracker(tree) if graph is None else DelaunayTracker(tree, graph)
    matrix, previous, cost, residual = np.eye(4), None, math.inf, math.inf
    moved = source
    # The Kabsch fit's source moments do not change between iterations: computed once.
    mean_source = source.mean(axis=0)
    centred = source - mean_source
    variance = float(np.einsum("nc,nc->", centred, centred)) / len(source)
    done = 0
    for done in range(1, iterations + 1):
        index = nearest(moved)
        if previous is not None and np.array_equal(index, previous):
            break
        matches = np.take(target, index, axis=0)  # (N, 3); 4x faster than target[index]
        mean_match = column_mean(matches)
        covariance = (matches - mean_match).T @ centred / len(source)
        rotation, translation, _, _ = umeyama_from_moments(mean_source, mean_match, covariance, np.asarray(variance),
                                                           with_scale=False)
        matrix = similarity_matrix(rotation, translation)
        moved = apply_transform(matrix, source)
        offset = moved - matches
        offset *= offset
        residual = float(np.mean((offset[:, 0] + offset[:, 1]) + offset[:, 2]))  # np.sum(axis=1)'s order
        if residual > cost:
            break
        previous, cost = index, residual
    return matrix, done, residual


_CHAMFER_CHUNK = 4096  # query points per KD-tree call while a Chamfer distance may still stop early


def _chamfer(recon: np.ndarray, recon_tree: cKDTree, matrix: np.ndarray, target: np.ndarray, target_tree: cKDTree,
             beat: float = math.inf) -> ChamferResult | None:
    """Chamfer distances of `recon` moved by the rigid `matrix` and `target`, or None when the bidirectional
    distance is not below `beat`. `recon_tree` is a tree of the unmoved `recon`: the distance from a target
    point to the moved set is that from the target point moved back.

    With a finite `beat`, the two directions are measured in chunks of points, alternating: the sums so far
    are a lower bound of the result (distances are not negative), and the measure stops once that bound
    reaches `beat`. A returned value is always the exact one (the means of the whole arrays, summed as
    without `beat`)."""
    moved = apply_transform(matrix, recon)
    back = (target - matrix[:3, 3]) @ matrix[:3, :3]  # the rigid inverse applied to the target points
    if math.isfinite(beat):
        to_target, to_recon = np.empty(len(moved)), np.empty(len(back))
        # The sum of the two means so far, and what it must stay below (a margin of 1e-9 for its rounding).
        partial, limit = 0.0, 2.0 * beat * (1.0 + 1e-9)
        for start in range(0, max(len(moved), len(back)), _CHAMFER_CHUNK):
            for query, tree, out in ((moved, target_tree, to_target), (back, recon_tree, to_recon)):
                chunk = slice(start, start + _CHAMFER_CHUNK)
                out[chunk] = tree.query(query[chunk])[0]
                partial += float(out[chunk].sum()) / len(query)
            if partial >= limit:
                return None
    else:
        to_target, to_recon = target_tree.query(moved)[0], recon_tree.query(back)[0]
    a, b = float(to_target.mean()), float(to_recon.mean())
    result = ChamferResult(a, b, 0.5 * (a + b))
    return result if result.symmetric < beat else None


FLIP_Y = np.diag([-1.0, 1.0, -1.0, 1.0])  # 180 degrees about the world Y axis, through the world origin


class _Target:
    """What the protocol needs of one target mesh, made on first use and shared by every reconstruction
    scored against it: its volume, its even samples (drawn first from the seeded generator, so every
    reconstruction's samples continue the same random stream, exactly as when scored alone), their trees
    and the Delaunay graph of its ICP points."""

    def __init__(self, mesh: trimesh.Trimesh, options: AnimodelOptions, name: str = "target"):
        self.mesh, self.options, self.name = mesh, options, name

    @functools.cached_property
    def volume(self) -> float:
        # A target enclosing no volume at the pitch (holes wider than a voxel) is refused: its "volume"
        # would be its shell's, and the rescale meaningless.
        return voxel_volume(self.mesh, self.options.min_cubes, self.name, enclosing=True)

    @functools.cached_property
    def samples(self) -> tuple[np.ndarray, cKDTree, np.ndarray, cKDTree, dict]:
        rng = np.random.default_rng(self.options.seed)
        align = spatial_order(sample_even(self.mesh, self.options.align_points, rng))
        points = spatial_order(sample_even(self.mesh, self.options.chamfer_points, rng))
        return align, cKDTree(align), points, chamfer_tree(points), rng.bit_generator.state

    @functools.cached_property
    def graph(self) -> DelaunayGraph | None:
        """The Delaunay graph of the ICP points (0.1-0.15 s; None for degenerate points: the KD-tree tracker
        then)."""
        return DelaunayGraph.of(self.samples[0])


def _score_one(reconstruction: trimesh.Trimesh | ArrayLike, target: _Target, unit_scale: float) -> AnimodelScore:
    options = target.options
    is_points = not isinstance(reconstruction, trimesh.Trimesh)
    if is_points:
        points = as_points("prediction", reconstruction)
        if len(points) == 0:
            inf = ChamferResult(math.inf, math.inf, math.inf)
            return AnimodelScore(inf, unit_scale, math.nan, False, np.eye(4), 0, True, False)
        surface = mesh_from_points(points, options.meshing)
        recon, enclosed = surface.mesh, surface.enclosed
    else:
        recon, enclosed = reconstruction, True
        _check_mesh("reconstruction", recon)
    volume_scale = 1.0
    if options.rescale:
        grid, pitch, _ = voxelise(recon, options.min_cubes, "reconstruction")
        volume_scale = (target.volume / (float(np.count_nonzero(grid)) * pitch**3)) ** (1.0 / 3.0)  # voxel_volume
        scaled = trimesh.Trimesh(recon.vertices * volume_scale, recon.faces, process=False)
        # Scaling about the origin scales the pitch alike, so the filled grid of the scaled mesh is `grid`
        # (up to the rounding of a lattice point at an exact half-voxel tie): `remesh(scaled)` without
        # voxelising again.
        recon = _match_box(_marching_cubes(grid), scaled.extents, scaled.centroid)
    target_align, align_tree, target_points, target_tree, state = target.samples
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = state  # the stream after the target's samples
    recon_align = spatial_order(sample_even(recon, options.align_points, rng))
    recon_points = spatial_order(sample_even(recon, options.chamfer_points, rng))
    recon_tree = chamfer_tree(recon_points)

    def align(start: np.ndarray) -> tuple[np.ndarray, int, float]:
        matrix, done, residual = icp_residual(apply_transform(start, recon_align), target_align,
                                              options.icp_iterations, align_tree, target.graph)
        return matrix @ start, done, residual

    def chamfer(matrix: np.ndarray, beat: float = math.inf) -> ChamferResult | None:
        return _chamfer(recon_points, recon_tree, matrix, target_points, target_tree, beat)

    total, done, residual = align(np.eye(4))
    flipped = False
    if not options.flip:
        result = chamfer(total)
    else:  # start from the first alignment turned about world Y (step 6)
        flip_total, flip_done, flip_residual = align(FLIP_Y @ total)
        # The flip is kept when strictly better, as Animodel requires. The Chamfer distance of the likelier
        # winner (the lower ICP residual) is measured first, so that the other's can stop early (`_chamfer`).
        if flip_residual < residual:
            flip_result = chamfer(flip_total)
            result = chamfer(total, np.nextafter(flip_result.symmetric, math.inf))  # kept on a tie
            if result is None:
                result, total, done, flipped = flip_result, flip_total, flip_done, True
        else:
            result = chamfer(total)
            flip_result = chamfer(flip_total, result.symmetric)
            if flip_result is not None:
                result, total, done, flipped = flip_result, flip_total, flip_done, True
    return AnimodelScore(result, unit_scale, volume_scale, flipped, total, done, is_points, enclosed)


def score_all(reconstructions: Sequence[trimesh.Trimesh | ArrayLike], target: trimesh.Trimesh,
              options: AnimodelOptions = AnimodelOptions(), target_name: str = "target") -> list[AnimodelScore]:
    """`score` of each reconstruction against one target: the same numbers, with the target's volume, samples
    and KD-trees made once (a model's cloud and the baseline's, say). `target_name` names it in errors."""
    _check_mesh(target_name, target)
    unit_scale = 1.0 / float(target.extents.max())
    shared = _Target(target, options, target_name)
    return [_score_one(reconstruction, shared, unit_scale) for reconstruction in reconstructions]


def score(reconstruction: trimesh.Trimesh | ArrayLike, target: trimesh.Trimesh,
          options: AnimodelOptions = AnimodelOptions(), target_name: str = "target") -> AnimodelScore:
    """Score one reconstruction against one target mesh with the Animodel protocol (module docstring).

    Args:
        reconstruction: a triangle mesh, or (N, 3) float points (meshed first by `mesh_from_points`),
            in the target's world frame with +Y up, scene units. An empty point cloud scores inf.
        target: the ground-truth triangle mesh (closed, Y-up world frame). With the rescale, one that encloses
            no volume at the voxel pitch (holes wider than a voxel) is refused (`voxel_volume`).
        options: protocol settings (Animodel's by default) and the seed of every random sample.
        target_name: names the target in error messages (e.g. its file).
    Returns:
        `AnimodelScore`.
    """
    return score_all([reconstruction], target, options, target_name)[0]
