"""The Embree-only limits of the CPU renderer: the rays one dual point map needs, cast by Embree alone.

`record_rays` renders a batch once with the Embree backend (one process) and keeps, per image, the posed
triangles handed to Embree and every ray batch actually cast (the primary rays of the candidate pixels and
each layer's continuation rays behind the previous hits). `replay` builds the same Embree scenes and casts
exactly those rays again with nothing else around them: no skinning, no camera set-up, no ray generation,
no peeling bookkeeping, no interpolation, no storing. Two scene builders replay them: embreex (its
`TriangleMesh` copies the mesh element by element) and the renderer's own direct binding
(`dualpm.render.embree_direct`: shared buffers, ray packets); bench/render.py prints the renderer's
maps/s as a fraction of each, measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from dualpm.render import embree


@dataclass
class ImageRays:
    """What Embree was given for one image: the triangles and each ray batch cast (origins, directions,
    segment starts and ends)."""

    vertices: np.ndarray  # (V, 3) float32 camera space
    faces: np.ndarray  # (F, 3) int32
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def rays(self) -> int:
        return sum(len(batch[0]) for batch in self.batches)


def record_rays(render) -> list[ImageRays]:
    """Call `render()` (an Embree render with workers=1, in this process) and return the rays it cast."""
    images: list[ImageRays] = []
    real_scene = embree.triangle_scene

    class RecordingScene:
        def __init__(self, scene):
            self.scene = scene

        def intersect(self, origins, directions, t_near, t_far):
            images[-1].batches.append(tuple(np.array(x, np.float32) for x in (origins, directions, t_near, t_far)))
            return self.scene.intersect(origins, directions, t_near, t_far)

    def recording_scene(verts, faces):
        images.append(ImageRays(np.array(verts, np.float32), np.array(faces, np.int32)))
        return RecordingScene(real_scene(verts, faces))

    embree._LAST_SCENE = None  # a cached scene would skip the build being recorded
    embree.triangle_scene = recording_scene
    try:
        render()
    finally:
        embree.triangle_scene = real_scene
    return images


def direct_scene():
    """The renderer's scene builder (`embree_direct.TriangleScene`), or None where that binding cannot load."""
    from dualpm.render import embree_direct

    library = embree_direct.load()
    return None if library is None else lambda verts, faces: embree_direct.TriangleScene(library, verts, faces)


def replay(images: list[ImageRays], build=embree.EmbreexScene) -> tuple[float, float, float]:
    """Build every image's scene with `build(verts, faces)` and cast its recorded rays through its `intersect`.

    Returns (seconds building, seconds casting, CPU seconds of this process for both). Building includes the
    BVH, which embreex commits at the first cast: one ray is cast first to separate it from the casting."""
    build_s = cast_s = 0.0
    one_ray = (np.zeros((1, 3), np.float32), np.array([[0.0, 0.0, 1.0]], np.float32), np.zeros(1, np.float32),
               np.ones(1, np.float32))
    cpu = time.process_time()
    for image in images:
        start = time.perf_counter()
        scene = build(image.vertices, image.faces)
        scene.intersect(*one_ray)
        middle = time.perf_counter()
        for batch in image.batches:
            scene.intersect(*batch)
        build_s, cast_s = build_s + middle - start, cast_s + time.perf_counter() - middle
    return build_s, cast_s, time.process_time() - cpu
