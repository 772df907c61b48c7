"""Dual point maps: rigged mesh + pose + camera -> per-pixel canonical and posed points over depth layers.

`render_dual_pointmaps` is the public entry point; `render_layers` is its general form that
interpolates any per-vertex attributes (e.g. normals for shading) from the same peeled layers.
Two backends give the same answer:

* ``cuda``: nvdiffrast `RasterizeCudaContext` + `DepthPeeler` + `interpolate` on the GPU; instanced mode
  when all meshes share one topology, range mode otherwise.
* ``cpu``: Embree ray casting through pixel centres (`embree_direct`, a ctypes binding to the Embree
  library of the embreex wheel; embreex itself where that cannot load), re-cast behind each hit for the
  next layer; images spread over processes.
* ``auto``: ``cuda`` when CUDA and nvdiffrast are usable, else ``cpu`` (logged, and returned by
  `resolve_backend`).

Output channels per pixel and layer: canonical xyz (3), posed xyz in camera space with the camera's
z-translation subtracted (3), alpha (1). Layer k is the k-th distinct surface along the pixel ray;
pixels/layers without a surface are all zeros.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dualpm.errors import BackendUnavailable
from dualpm.store.encoding import SparseDualPointMap, sparse_dual_pointmap

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "cpu")
CHANNELS = 7  # canonical xyz, posed xyz, alpha


@dataclass(frozen=True)
class MeshBatch:
    """Inputs of one render call, normalised to lists (one entry per image).

    values[b]: (V_b, C + 3) float32 per-vertex values to interpolate: the attributes (canonical xyz for
        dual point maps), then the posed camera-space positions minus the image's `posed_offset`.
    posed_camera[b]: (V_b, 3) float32 posed vertices in camera space (view applied, nothing subtracted):
        the geometry that is rasterised or ray cast.
    faces[b]: (F_b, 3) int64 triangle indices into that image's vertices.
    shared_topology: all images use the same `faces` tensor and vertex count (instanced mode).
    """

    values: list[Tensor]
    posed_camera: list[Tensor]
    faces: list[Tensor]
    shared_topology: bool


def _as_list(x: Tensor | Sequence[Tensor], batch: int, name: str) -> list[Tensor]:
    if torch.is_tensor(x):
        if x.dim() == 2:
            return [x] * batch
        if x.dim() == 3 and x.shape[0] == batch:
            return list(x.unbind(0))
        raise ValueError(f"{name} must be (V, 3), (B, V, 3) or a list of (V_b, 3); got {tuple(x.shape)}")
    items = list(x)
    if len(items) != batch:
        raise ValueError(f"{name} has {len(items)} entries for a batch of {batch}")
    return items


def _prepare(attributes, posed, faces, view: Tensor, posed_offset: Tensor | None) -> MeshBatch:
    batch = view.shape[0]
    attrs = _as_list(attributes, batch, "attributes")
    posed_l = _as_list(posed, batch, "posed")
    shared = torch.is_tensor(faces) and faces.dim() == 2
    faces_l = [faces] * batch if shared else _as_list(faces, batch, "faces")
    cam, values = [], []
    for b, (a, p, f) in enumerate(zip(attrs, posed_l, faces_l, strict=True)):
        if p.dim() != 2 or p.shape[-1] != 3 or a.dim() != 2 or a.shape[0] != p.shape[0]:
            raise ValueError(f"image {b}: posed must be (V, 3) and attributes (V, C); got {tuple(p.shape)}, {tuple(a.shape)}")
        if a.shape[1] != attrs[0].shape[1]:
            raise ValueError(f"image {b}: every image needs the same number of attribute channels")
        if f.dim() != 2 or f.shape[-1] != 3:
            raise ValueError(f"image {b}: faces must be (F, 3), got {tuple(f.shape)}")
        # camera space: p_cam = R p + t (float32 like the GPU path)
        v = view[b].to(p.device, torch.float32)
        cam.append(p.float() @ v[:3, :3].T + v[:3, 3])
        shifted = cam[-1] if posed_offset is None else cam[-1] - posed_offset[b].to(p.device, torch.float32)
        values.append(torch.cat([a.to(p.device, torch.float32), shifted], dim=1))
    return MeshBatch(values=values, posed_camera=cam, faces=[f.long() for f in faces_l], shared_topology=shared)


def cuda_backend_status() -> str | None:
    """None when the cuda backend is usable here, else the reason it is not (for messages)."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError as err:
        return (
            f"nvdiffrast is not installed ({err}); install it with: pip install setuptools wheel ninja && "
            "pip install --no-build-isolation 'git+https://github.com/NVlabs/nvdiffrast.git@v0.4.0' "
            "(or `pip install --no-build-isolation -e '.[cuda]'` in this repository; needs the CUDA toolkit)"
        )
    return None


def resolve_backend(backend: str) -> str:
    """Map 'auto' to 'cuda' or 'cpu'; raise `BackendUnavailable` if 'cuda' is asked for but unusable."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "cpu":
        return "cpu"
    reason = cuda_backend_status()
    if backend == "cuda":
        if reason is not None:
            raise BackendUnavailable(f"--backend cuda cannot be used: {reason}")
        return "cuda"
    chosen = "cpu" if reason else "cuda"
    log.info("render backend auto -> %s%s", chosen, f" ({reason})" if reason else "")
    return chosen


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if height <= 0 or width <= 0:
        raise ValueError(f"resolution {height}x{width} must be positive")
    return height, width


def render_layers(
    attributes: Tensor | Sequence[Tensor],
    posed: Tensor | Sequence[Tensor],
    faces: Tensor | Sequence[Tensor],
    view: Tensor,
    projection: Tensor,
    resolution: int | tuple[int, int],
    num_layers: int,
    backend: str = "auto",
    workers: int | None = None,
    posed_offset: Tensor | None = None,
    sparse: bool = False,
) -> Tensor | list[SparseDualPointMap]:
    """Peel depth layers and interpolate per-vertex attributes and camera-space positions.

    The general form of `render_dual_pointmaps` (which passes canonical positions as the
    attributes); other callers add e.g. normals to shade images from the same pass.

    Args:
        attributes: per-vertex float attributes: (V, C) shared by all images, (B, V, C), or a list
            of B tensors (V_b, C).
        posed, faces, view, projection, resolution, num_layers, backend, workers: as in
            `render_dual_pointmaps`.
        posed_offset: optional (B, 3) float, scene units, subtracted from the posed xyz of every hit
            (interpolated from shifted vertices, so empty pixels stay zero); none by default.
        sparse: return the maps in the stored form instead (C = 3 only): B `SparseDualPointMap`s, CPU
            numpy. The cpu backend makes them from its hits without a dense block; cuda's dense maps are
            split on the CPU.
    Returns:
        (B, H, W, L, C + 4) float32: attributes (C), posed xyz in camera space minus `posed_offset` (3),
        alpha (1). Empty pixels/layers are all zeros.
    """
    height, width = _size(resolution)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if view.dim() != 3 or view.shape[1:] != (4, 4) or projection.shape != view.shape:
        raise ValueError(f"view and projection must both be (B, 4, 4); got {tuple(view.shape)}, {tuple(projection.shape)}")
    chosen = resolve_backend(backend)
    if posed_offset is not None and posed_offset.shape != (view.shape[0], 3):
        raise ValueError(f"posed_offset must be (B, 3) = ({view.shape[0]}, 3); got {tuple(posed_offset.shape)}")
    batch = _prepare(attributes, posed, faces, view, posed_offset)
    if sparse and batch.values[0].shape[1] != 6:
        raise ValueError(f"sparse maps hold 3 attribute channels (canonical xyz), got {batch.values[0].shape[1] - 3}")
    if chosen == "cuda":
        from dualpm.render.nvdiffrast import render_cuda

        dense = render_cuda(batch, projection, height, width, num_layers)
        if not sparse:
            return dense
        return [SparseDualPointMap(*sparse_dual_pointmap(m, "float32"), num_layers) for m in dense.cpu().numpy()]
    from dualpm.render.embree import render_cpu

    return render_cpu(batch, projection, height, width, num_layers, workers=workers, sparse=sparse)


def render_dual_pointmaps(
    canonical: Tensor | Sequence[Tensor],
    posed: Tensor | Sequence[Tensor],
    faces: Tensor | Sequence[Tensor],
    view: Tensor,
    projection: Tensor,
    resolution: int | tuple[int, int],
    num_layers: int,
    backend: str = "auto",
    workers: int | None = None,
    sparse: bool = False,
) -> Tensor | list[SparseDualPointMap]:
    """Render multi-layer dual point maps for a batch of meshes and cameras.

    Args:
        canonical: canonical (bind-pose) vertex positions, float, scene units: (V, 3) shared by all
            images, (B, V, 3), or a list of B tensors (V_b, 3) for meshes of different topology.
        posed: posed vertex positions in the Y-up world, same layout as `canonical`.
        faces: (F, 3) integer triangle indices shared by all images (instanced mode), or a list of
            B tensors (F_b, 3) (range mode). Degenerate triangles are ignored.
        view: (B, 4, 4) world-to-camera matrices (OpenGL camera looking down -Z).
        projection: (B, 4, 4) projection matrices as `dualpm.camera.projection_from_focal`
            (y row negated: image row 0 is the top).
        resolution: H or (H, W) in pixels.
        num_layers: L, the number of depth layers to peel.
        backend: 'auto', 'cuda' or 'cpu'.
        workers: cpu backend only: processes to spread images over (default: all available cores;
            1 renders in this process).
        sparse: return B `dualpm.store.encoding.SparseDualPointMap`s (hit counts and hit values, CPU
            numpy, the stored form) instead of the dense tensor; on the cpu backend ~1.5 ms a map faster
            than the dense block and its split (what `dualpm-prep render` stores).
    Returns:
        (B, H, W, L, 7) float32 tensor: canonical xyz, posed xyz (camera space minus `view[:, 2, 3]`
        in z), alpha. On the GPU for 'cuda', on the CPU for 'cpu'.
    """
    # "subtract depth": the camera's z translation removed from the posed z of every hit
    depth = torch.zeros(view.shape[0], 3, dtype=torch.float32, device=view.device)
    depth[:, 2] = view[:, 2, 3]
    return render_layers(canonical, posed, faces, view, projection, resolution, num_layers, backend, workers, depth,
                         sparse)
