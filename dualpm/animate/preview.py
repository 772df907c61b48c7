"""preview.png: input frames above the fitted rig re-rendered through each frame's camera (a check of the
fit).

The rig is posed by the fitted poses, rendered with the project's rasteriser (`dualpm.render.render_layers`,
Embree on CPU, nvdiffrast on CUDA) through the estimated cameras and shaded by its camera-space normals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from dualpm.animate.dataset import view_matrices
from dualpm.animate.fit import CameraTrack
from dualpm.camera import projection_from_focal
from dualpm.fileio import atomic_output
from dualpm.gltf import SkinnedMesh
from dualpm.images import open_image, rgb_array
from dualpm.render import render_layers
from dualpm.skinning import skin
from dualpm.viz import image_grid

MAX_COLUMNS = 8


def shaded_renders(rig: SkinnedMesh, poses: np.ndarray, camera: CameraTrack, height: int) -> np.ndarray:
    """(F, height, width, 3) uint8 images of the posed rig through the cameras (white background).

    Args:
        rig: the fitted rig; poses: (F, N, 7) node-local poses in its units; camera: the F views.
        height: image height in pixels (width = height * camera.aspect).
    """
    width = max(1, round(height * camera.aspect))
    posed = skin(rig, poses, dtype=torch.float32)  # (F, V, 3)
    faces = torch.as_tensor(np.array(rig.faces))
    corners = posed[:, faces]  # (F, T, 3, 3)
    edges = corners[:, :, 1:] - corners[:, :, :1]  # (F, T, 2, 3)
    face_normals = torch.linalg.cross(edges[:, :, 0], edges[:, :, 1], dim=-1)
    normals = torch.zeros_like(posed).index_add_(1, faces.reshape(-1),
                                                 face_normals.repeat_interleave(3, dim=1))
    normals = normals / normals.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # world = camera axes here
    view = torch.from_numpy(view_matrices(camera.depth)).float()
    focal = torch.from_numpy(np.asarray(camera.focal_mm)).float()
    projection = projection_from_focal(focal, aspect=camera.aspect)
    # In this process (workers=1): a few small frames, no worker pool to start.
    out = render_layers(normals, posed, faces, view, projection, (height, width), 1, workers=1)[:, :, :, 0]
    alpha = out[..., -1:]
    shade = 0.2 + 0.8 * out[..., 2:3].abs()  # facing the camera: bright
    colour = torch.tensor([0.85, 0.55, 0.3]) * shade * alpha + (1 - alpha)
    return (colour.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_preview(path: Path, ids: Sequence[str], images: Mapping[str, Path], rig: SkinnedMesh,
                  poses: np.ndarray, camera: CameraTrack, height: int = 160) -> list[str]:
    """Write the sheet for up to `MAX_COLUMNS` evenly spaced frames; returns the ids shown."""
    picks = np.unique(np.linspace(0, len(ids) - 1, min(len(ids), MAX_COLUMNS)).round().astype(int))
    track = CameraTrack(np.asarray(camera.focal_mm)[picks], camera.aspect, np.asarray(camera.depth)[picks])
    renders = shaded_renders(rig, np.asarray(poses)[picks], track, height)
    shown = [ids[k] for k in picks]
    tiles, labels = [], []
    if any(i in images for i in shown):
        for sample_id, render in zip(shown, renders, strict=True):
            tiles.append((rgb_array(open_image(images[sample_id])) * 255).round().astype(np.uint8)
                         if sample_id in images else np.full_like(render, 255))
            labels.append(f"frame {sample_id}")
    tiles += list(renders)
    labels += ["fitted rig"] * len(renders)
    sheet = image_grid(tiles, labels, columns=len(shown), cell=height)
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG")
    return shown
