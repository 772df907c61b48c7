"""The Embree-only limit of the CPU renderer: the rays one dual point map needs, cast by embreex alone.

`record_rays` renders a batch once with the Embree backend (one process) and keeps, per image, the posed
triangles handed to Embree and every ray batch actually cast (the primary rays of the candidate pixels and
each layer's continuation rays behind the previous hits). `replay` builds the same Embree scenes and casts
exactly those rays again with nothing else around them: no skinning, no camera set-up, no ray generation,
no peeling bookkeeping, no interpolation, no storing. Its maps/s is the limit the renderer can approach on
this machine; bench/render.py prints the renderer's maps/s as a fraction of it, measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

import embreex.mesh_construction as mesh_construction
import embreex.rtcore_scene as rtcore_scene


@dataclass
class ImageRays:
    """What Embree was given for one image: the triangles and each ray batch cast (start, direction, length)."""

    vertices: np.ndarray | None = None  # (V, 3) float32 camera space
    faces: np.ndarray | None = None  # (F, 3) int32
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def rays(self) -> int:
        return sum(len(start) for start, _, _ in self.batches)


def record_rays(render) -> list[ImageRays]:
    """Call `render()` (an Embree render with workers=1, in this process) and return the rays it cast."""
    images: list[ImageRays] = []
    real_scene, real_mesh = rtcore_scene.EmbreeScene, mesh_construction.TriangleMesh

    class RecordingScene(real_scene):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            images.append(ImageRays())

        def run(self, start, direction, dists=None, output=None):
            images[-1].batches.append((start.copy(), direction.copy(), dists.copy()))
            return super().run(start, direction, dists=dists, output=output)

    def recording_mesh(scene, vertices, faces):
        images[-1].vertices, images[-1].faces = vertices.copy(), faces.copy()
        return real_mesh(scene, vertices, faces)

    rtcore_scene.EmbreeScene, mesh_construction.TriangleMesh = RecordingScene, recording_mesh
    try:
        render()
    finally:
        rtcore_scene.EmbreeScene, mesh_construction.TriangleMesh = real_scene, real_mesh
    return images


def replay(images: list[ImageRays]) -> tuple[float, float]:
    """Build every image's scene and cast its recorded rays; returns (seconds building, seconds casting).

    Building: the Embree scene, embreex's `TriangleMesh` (it copies the buffers element by element) and the
    BVH, which Embree commits at the first cast: one ray is cast first to separate it from the casting."""
    build = cast = 0.0
    one_ray = (np.zeros((1, 3), np.float32), np.array([[0.0, 0.0, 1.0]], np.float32), np.ones(1, np.float32))
    for image in images:
        start = time.perf_counter()
        scene = rtcore_scene.EmbreeScene(robust=True)
        mesh_construction.TriangleMesh(scene, image.vertices, image.faces)
        scene.run(*one_ray[:2], dists=one_ray[2], output=1)
        middle = time.perf_counter()
        for origin, direction, dists in image.batches:
            scene.run(origin, direction, dists=dists, output=1)
        build, cast = build + middle - start, cast + time.perf_counter() - middle
    return build, cast
