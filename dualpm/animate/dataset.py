"""The fitted poses as a dataset in the published DualPM layout (docs/dataset.md), renderable by
`dualpm-prep render`:

    OUT/shapes/<model>/<model>_shape.gltf   the fitted rig (the units the model saw: any --mesh-scale applied)
    OUT/poses/<id>_pose.npz                 node-local poses (`dualpm.skinning.write_pose_file`)
    OUT/cameras/<id>_camera.txt             camera-to-world, Blender Z-up (`dualpm.camera.format_camera_txt`)
    OUT/metadata/<id>_metadata.txt          model_name, focal_length (`dualpm.data.source.format_metadata`)

The world is the posed points' frame (camera space with view[2, 3] subtracted from z), so each camera's
view matrix is a translation by (0, 0, view[2, 3]) and rendering gives back the predictions' frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dualpm.animate.fit import CameraTrack
from dualpm.camera import camera_pose_from_view, format_camera_txt
from dualpm.data.source import Layout, SampleMetadata, format_metadata
from dualpm.fileio import atomic_write_text
from dualpm.gltf import SkinnedMesh, save_skinned_mesh
from dualpm.skinning import write_pose_file


def view_matrices(depth: np.ndarray) -> np.ndarray:
    """(F, 4, 4) float64 world-to-camera matrices: translations by (0, 0, depth[f])."""
    view = np.broadcast_to(np.eye(4), (len(depth), 4, 4)).copy()
    view[:, 2, 3] = depth
    return view


def write_dataset(out: Path, rig: SkinnedMesh, model: str, ids: Sequence[str], poses: np.ndarray,
                  camera: CameraTrack) -> Layout:
    """Write shapes/, poses/, cameras/ and metadata/ under `out` (files atomically).

    Args:
        rig: the rig the poses belong to (written as the model's shape).
        model: model name (a folder name of shapes/).
        ids: F sample ids; poses: (F, N, 7) float node-local poses; camera: the F views.
    """
    layout = Layout(out)
    for folder in ("poses", "cameras", "metadata"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    shape = layout.root / "shapes" / model / f"{model}_shape.gltf"
    shape.parent.mkdir(parents=True, exist_ok=True)
    save_skinned_mesh(rig, shape)
    world = camera_pose_from_view(torch.from_numpy(view_matrices(camera.depth))).numpy()
    for sample_id, pose, camera_pose, focal in zip(ids, poses, world, camera.focal_mm, strict=True):
        write_pose_file(layout.pose(sample_id), pose)
        atomic_write_text(layout.camera(sample_id), format_camera_txt(camera_pose))
        atomic_write_text(layout.metadata(sample_id), format_metadata(SampleMetadata(model, float(focal))))
    return layout
