"""CPU backend: Embree ray casting through pixel centres, layer by layer.

For each image one Embree scene is built from the camera-space posed mesh. Rays start on the near
plane at each pixel centre (`dualpm.camera.pixel_rays`, the same projection the GPU rasteriser uses)
and end on the far plane. Layer k+1 re-casts only the rays that hit in layer k, starting just behind
that hit, so a surface at the same depth (a shared edge, a duplicated triangle) is never reported
twice. Hits are (pixel, layer, triangle, barycentrics); the points are interpolated afterwards for the
whole batch at once with the same barycentric rule as the GPU path.

Embree is reached through `dualpm.render.embree_direct` (shared buffers, packets of 16 rays), or through
embreex where that binding cannot load. Images are independent, so a batch is spread over worker
processes (the per-packet calls and the numpy around them hold the GIL, so threads would not help).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dualpm.camera import pixel_rays
from dualpm.render import embree_direct
from dualpm.store.encoding import SparseDualPointMap

# Next layer starts this far (relative to the hit's distance from the camera) behind a hit: far above
# float32 intersection error (~1e-7 relative), far below any real surface separation.
PEEL_EPSILON = 1e-5


@dataclass(frozen=True)
class Hits:
    """Ray hits of one image, in layer-major order."""

    pixel: np.ndarray  # (n,) int64 flat pixel index row * W + col
    layer: np.ndarray  # (n,) int64
    triangle: np.ndarray  # (n,) int64 face index
    barycentric: np.ndarray  # (n, 2) float32 Embree (u, v): point = (1-u-v) v0 + u v1 + v v2


def _candidate_pixels(verts_cam: np.ndarray, projection: np.ndarray, height: int, width: int) -> np.ndarray:
    """Flat indices of pixels whose centre may see the mesh (its projected bounding box).

    Falls back to every pixel when some vertex is at or behind the camera plane, where the
    projection of a triangle is not bounded by its projected vertices.
    """
    if verts_cam.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    xyw = projection[[0, 1, 3], :3] @ verts_cam.T.astype(np.float64) + projection[[0, 1, 3], 3:]  # (3, V) clip x, y, w
    if (xyw[2] <= 1e-9).any():
        return np.arange(height * width, dtype=np.int64)
    ndc = xyw[:2] / xyw[2]  # (2, V): reduced along rows, far faster than along the columns of a (V, 2)
    (col0, row0), (col1, row1) = (ndc.min(1) + 1) * 0.5 * (width, height), (ndc.max(1) + 1) * 0.5 * (width, height)
    # pixel j's centre is j + 0.5; one pixel of margin against rounding
    c0 = max(int(np.floor(col0 - 0.5)) - 1, 0)
    c1 = min(int(np.ceil(col1 - 0.5)) + 1, width - 1)
    r0 = max(int(np.floor(row0 - 0.5)) - 1, 0)
    r1 = min(int(np.ceil(row1 - 0.5)) + 1, height - 1)
    if c0 > c1 or r0 > r1:
        return np.zeros(0, dtype=np.int64)
    rows = np.arange(r0, r1 + 1, dtype=np.int64)
    cols = np.arange(c0, c1 + 1, dtype=np.int64)
    return (rows[:, None] * width + cols[None, :]).ravel()


def cast_layers(
    verts_cam: np.ndarray, faces: np.ndarray, projection: np.ndarray, height: int, width: int, num_layers: int
) -> Hits:
    """Peel up to `num_layers` surfaces per pixel of one image with Embree.

    Args:
        verts_cam: (V, 3) float32 posed vertices in camera space.
        faces: (F, 3) int triangle indices.
        projection: (4, 4) projection matrix (float64 preferred).
        height, width, num_layers: output size.
    """
    empty = Hits(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.float32))
    if faces.shape[0] == 0:
        return empty
    pixels = _candidate_pixels(verts_cam, projection, height, width)
    if pixels.size == 0:
        return empty
    origin, direction, t_end = pixel_rays(projection, height, width, pixels)  # (n, 3), (n, 3), (n,) float64

    scene = triangle_scene(verts_cam, faces)

    # Every ray keeps its start on the near plane; layer k + 1 casts the segment from just behind the
    # layer-k hit (t_near) to the far plane, for the rays that hit in layer k (indices `rays`).
    # Component-major (3, n) copies: each layer's gather and the packing into Embree's packets then copy
    # whole rows (pixel_rays returns (n, 3) views of such rows).
    origin32, dir32, t_end32 = origin.T.astype(np.float32), direction.T.astype(np.float32), t_end.astype(np.float32)
    # |origin + t direction|^2 = |origin|^2 + 2 t origin.direction + t^2 (unit directions)
    origin_sq, origin_dir = np.einsum("ij,ij->j", origin.T, origin.T), np.einsum("ij,ij->j", origin.T, direction.T)
    rays, t_near = np.arange(pixels.size), np.float32(0.0)
    out_ray, out_count, out_tri, out_u, out_v = [], [], [], [], []
    for _ in range(num_layers):
        if len(out_ray) == 0:  # all candidate rays, from the near plane
            prim, u, v, t_hit = scene.intersect(origin32.T, dir32.T, t_near, t_end32)
        else:
            prim, u, v, t_hit = scene.intersect(origin32[:, rays].T, dir32[:, rays].T, t_near, t_end32[rays])
        hit = np.flatnonzero(prim >= 0)  # indices: one mask scan, then cheap takes
        rays, t_hit = rays[hit], t_hit[hit].astype(np.float64)
        if rays.size == 0:
            break
        out_ray.append(rays)
        out_count.append(rays.size)
        out_tri.append(prim[hit])
        out_u.append(u[hit])
        out_v.append(v[hit])
        distance = np.sqrt(origin_sq[rays] + t_hit * (2 * origin_dir[rays] + t_hit))  # the hit's, from the camera
        t_near = t_hit + PEEL_EPSILON * np.maximum(distance, 1.0)
        alive = np.flatnonzero(t_near < t_end[rays])
        rays, t_near = rays[alive], t_near[alive].astype(np.float32)
        if rays.size == 0:
            break
    if not out_ray:
        return empty
    return Hits(pixels[np.concatenate(out_ray)], np.repeat(np.arange(len(out_count)), out_count),
                np.concatenate(out_tri).astype(np.int64), np.stack([np.concatenate(out_u), np.concatenate(out_v)], 1))


class EmbreexScene:
    """`embree_direct.TriangleScene`'s interface through embreex (its `TriangleMesh` copies the mesh element
    by element): the fallback where the direct binding cannot load, and the baseline of bench/embree_limit.py.

    Args:
        verts: (V, 3) float32 vertices; faces: (F, 3) int32 triangles.
    """

    def __init__(self, verts: np.ndarray, faces: np.ndarray):
        from embreex.mesh_construction import TriangleMesh
        from embreex.rtcore_scene import EmbreeScene

        self.scene = EmbreeScene(robust=True)
        if len(faces):
            TriangleMesh(self.scene, verts, faces)

    def intersect(self, origins: np.ndarray, directions: np.ndarray, t_near: np.ndarray,
                  t_far: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """See `embree_direct.TriangleScene.intersect`. embreex casts from tnear = 0: the ray starts at
        origin + t_near * direction instead (float32), and its distances are shifted back."""
        t_near = np.broadcast_to(np.asarray(t_near, np.float32), (len(origins),))
        start = (origins + t_near[:, None] * directions).astype(np.float32)
        # run() writes the hit distances into the array it is given
        result = self.scene.run(start, np.ascontiguousarray(directions, np.float32),
                                dists=np.asarray(t_far, np.float32) - t_near, output=1)
        return result["primID"], result["u"], result["v"], result["tfar"] + t_near


_LAST_SCENE: tuple[np.ndarray, np.ndarray, object] | None = None


def triangle_scene(verts: np.ndarray, faces: np.ndarray):
    """A robust Embree scene of one triangle mesh; the last one built in this process is reused.

    robust=True: watertight intersection, so a ray through a shared edge cannot slip between
    triangles. The one-entry cache (the float32 vertices and int32 faces compared in full) lets a second
    caster of the same mesh, e.g. the synth's shadow rays after the layers, skip the BVH build.

    Args:
        verts: (V, 3) float vertices (cast to float32); faces: (F, 3) int triangles.
    Returns:
        an `embree_direct.TriangleScene`, or an `EmbreexScene` where the direct binding cannot load; both
        have `intersect(origins, directions, t_near, t_far) -> (primID, u, v, tfar)`.
    """
    global _LAST_SCENE
    verts = np.ascontiguousarray(verts, dtype=np.float32)
    faces = np.ascontiguousarray(faces, dtype=np.int32)
    if _LAST_SCENE is not None and np.array_equal(_LAST_SCENE[0], verts) and np.array_equal(_LAST_SCENE[1], faces):
        return _LAST_SCENE[2]
    embree = embree_direct.load()
    scene = EmbreexScene(verts, faces) if embree is None else embree_direct.TriangleScene(embree, verts, faces)
    _LAST_SCENE = (verts.copy(), faces.copy(), scene)
    return scene


_POOL: ProcessPoolExecutor | None = None
_POOL_SIZE = 0


def _init_worker() -> None:
    # one image per process at a time: intra-op threads would only contend for the same cores
    torch.set_num_threads(1)


def _pool(workers: int) -> ProcessPoolExecutor:
    global _POOL, _POOL_SIZE
    if _POOL is None or _POOL_SIZE != workers:
        if _POOL is not None:
            _POOL.shutdown()
        # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock
        _POOL = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker
        )
        _POOL_SIZE = workers
    return _POOL


@atexit.register
def _shutdown_pool() -> None:
    if _POOL is not None:
        _POOL.shutdown(cancel_futures=True)


def default_workers() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def render_cpu(batch, projection: Tensor, height: int, width: int, num_layers: int, workers: int | None = None,
               sparse: bool = False) -> Tensor | list[SparseDualPointMap]:
    """Embree backend of `dualpm.render.render_layers` (see there); returns (B, H, W, L, C + 4), or with
    `sparse` one `SparseDualPointMap` per image (C = 3), made from the hits without a dense block."""
    size = len(batch.faces)
    proj = projection.detach().to("cpu", torch.float64).numpy()
    jobs = [
        (p.detach().cpu().numpy(), f.detach().cpu().numpy(), proj[b], height, width, num_layers)
        for b, (p, f) in enumerate(zip(batch.posed_camera, batch.faces, strict=True))
    ]
    workers = default_workers() if workers is None else workers
    if workers <= 1 or size <= 1:
        hits = [cast_layers(*job) for job in jobs]
    else:
        hits = list(_pool(min(workers, size)).map(cast_layers, *zip(*jobs, strict=True)))

    # One interpolation for the whole batch: every image's vertex values stacked, hits indexed into them.
    values = torch.cat(batch.values).detach().cpu().numpy()  # (sum V, C + 3) float32
    first = np.cumsum([0] + [len(p) for p in batch.posed_camera[:-1]])
    corners = np.concatenate([job[1][h.triangle] + first[b] for b, (job, h) in enumerate(zip(jobs, hits, strict=True))])
    weights = np.empty((len(corners), 3), np.float32)  # (1 - u - v, u, v)
    weights[:, 1:] = np.concatenate([h.barycentric for h in hits])
    weights[:, 0] = 1 - weights[:, 1] - weights[:, 2]
    if sparse:
        # Hits come layer by layer, each layer's in raster order: already the stored (hit_order) order.
        points = np.einsum("nk,nkc->nc", weights, values[corners])  # (n, C + 3)
        ends = np.cumsum([len(h.pixel) for h in hits])
        return [SparseDualPointMap(np.bincount(h.pixel, minlength=height * width).astype(np.uint8).reshape(height, width),
                                   part, num_layers)
                for h, part in zip(hits, np.split(points, ends[:-1]), strict=True)]
    slot = np.concatenate([(b * height * width + h.pixel) * num_layers + h.layer for b, h in enumerate(hits)])
    rows = np.ones((len(slot), values.shape[1] + 1), np.float32)  # alpha 1
    rows[:, :-1] = np.einsum("nk,nkc->nc", weights, values[corners])  # corners (n, 3) -> (n, 3, C + 3)
    # numpy, not torch.zeros: numpy asks the kernel for huge pages for a block this size, torch's 4 KB
    # pages took 5x longer to fault in (~4 ms per 160x160x8 map on the benchmark machine)
    out = np.zeros((size * height * width * num_layers, values.shape[1] + 1), np.float32)
    out[slot] = rows
    return torch.from_numpy(out).view(size, height, width, num_layers, values.shape[1] + 1)
